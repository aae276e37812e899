"""Decode CUDA graphs (workers/model/cuda_graph_runner.py) on a GPU: replay equals the eager step.

- Model level, fp32 (TF32 off; the experts stage runs "dense" inside the graph) and bf16 (the
  grouped kernel where torch has it): at every bucket, a full bucket and one padded up to it give
  the eager step's ids and logits; the replay path never waits for the device; a spent capture
  budget skips the smaller buckets and a small step pads up to the one captured.
- Engine level (fp32): a single-process engine on CUDA captures its buckets at build and gives the
  ids of an `enforce_eager` engine, for a staggered batch, across preemption by recompute and
  across an abort mid-stream. (tests/gpu/test_engine_gpu.py runs the CPU engine cases on CUDA
  engines, which now replay their decode steps too.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import pytest
import torch

from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from tests.engine_helpers import collect, run_requests
from tests.gpu.decisive_checkpoint import save_decisive_mixtral, top2_gaps
from tests.integration.test_engine import BASE, workload
from tests.model_helpers import save_hf_mixtral
from workers.model.attention_metadata import AttentionMetadata, SeqExtent
from workers.model.batch_spec import ScheduledBatch, ScheduledSeq
from workers.model.cuda_graph_buckets import decode_buckets
from workers.model.cuda_graph_budget import CaptureBudget
from workers.model.cuda_graph_capture import capture_decode_graphs
from workers.model.kv_cache import KVCache
from workers.model.loader import load_local_model
from workers.model.runner import ModelRunner
from workers.model.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

P = 4
MAX_SEQS = 256
BLOCKS_PER_SEQ = 12  # prompts of up to 40 tokens and a few decode steps
NUM_BLOCKS = MAX_SEQS * BLOCKS_PER_SEQ
SCRATCH = NUM_BLOCKS  # the cache has one block more than the sequences use
# fp32 graph vs eager differ by rounding only (another experts kernel, other matmul row counts);
# bf16 by bf16 rounding of the same. Rows whose top-2 gap is below NEAR_TIE are decided by that
# rounding, so their ids are not compared (the logits still are).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
NEAR_TIE = {torch.float32: 1e-3, torch.bfloat16: 0.25}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(request, cuda_device, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"graphs-{request.param}")
    save_decisive_mixtral(out, num_hidden_layers=2, sliding_window=24, max_position_embeddings=256)
    return load_local_model(out, request.param, device=cuda_device)


@contextlib.contextmanager
def no_device_waits():
    """Any host sync inside raises (torch's sync debug mode)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def prefilled(model, device):
    """MAX_SEQS prompts prefilled eagerly into shuffled block tables; (cache, extents of each
    sequence's first decode step, the ids that step feeds)."""
    rng = random.Random(0)
    cache = KVCache(model.cfg, NUM_BLOCKS + 1, P, dtype=model.dtype, device=device)
    order = list(range(NUM_BLOCKS))
    rng.shuffle(order)
    tables = [tuple(order[i * BLOCKS_PER_SEQ:(i + 1) * BLOCKS_PER_SEQ]) for i in range(MAX_SEQS)]
    prompts = [[rng.randrange(3, model.cfg.vocab_size) for _ in range(rng.randint(1, 40))]
               for _ in range(MAX_SEQS)]
    out = ModelRunner(model, cache).execute(ScheduledBatch(tuple(
        ScheduledSeq(i, tuple(p), 0, tables[i], True, SamplingParams(max_tokens=4), 0)
        for i, p in enumerate(prompts))))
    extents = [SeqExtent(len(p), 1, tables[i]) for i, p in enumerate(prompts)]
    return cache, extents, list(out.token_ids)


def eager_logits(model, cache, ids, extents, device):
    meta = AttentionMetadata.build(extents, P, device)
    return model.logits(model.forward(torch.tensor(ids, device=device), meta, cache))


def assert_same_step(got, want, dtype, what):
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE[dtype] * scale, msg=lambda m: f"{what}: {m}")
    decided = top2_gaps(want) >= NEAR_TIE[dtype]
    assert int(decided.sum()) >= want.shape[0] // 2, f"{what}: too few decisive rows to compare ids"
    assert torch.equal(got.argmax(-1)[decided], want.argmax(-1)[decided]), what


def test_replay_equals_eager_at_every_bucket(model, cuda_device, caplog):
    cache, extents, ids = prefilled(model, cuda_device)
    with caplog.at_level(logging.INFO, logger="workers.model.cuda_graph_capture"):
        graphs = capture_decode_graphs(model, cache, scratch_block=SCRATCH, max_num_seqs=MAX_SEQS)
    assert graphs.buckets == decode_buckets(MAX_SEQS)
    assert f"batch size {MAX_SEQS} captured" in caplog.text  # the progress line, largest first
    for bucket in graphs.buckets:
        for n in sorted({bucket, bucket // 2 + 1}):  # a full bucket, and one padded up to it
            assert graphs.step_bucket(extents[:n]) == bucket
            want = eager_logits(model, cache, ids[:n], extents[:n], cuda_device)
            got = graphs.run(ids[:n], extents[:n], bucket).clone()
            assert_same_step(got, want, model.dtype, f"{n} sequences in bucket {bucket}")
    assert set(graphs.runs_per_bucket) == set(graphs.buckets)


def test_replay_never_waits_for_the_device(model, cuda_device):
    cache, extents, ids = prefilled(model, cuda_device)
    graphs = capture_decode_graphs(model, cache, scratch_block=SCRATCH, max_num_seqs=16)
    want = eager_logits(model, cache, ids[:5], extents[:5], cuda_device)
    with no_device_waits():
        logits = graphs.run(ids[:5], extents[:5], 8)
    assert_same_step(logits.clone(), want, model.dtype, "5 sequences in bucket 8")
    # The next step: one token further, with the ids just chosen.
    nxt = [SeqExtent(e.start_pos + 1, 1, e.block_table) for e in extents[:5]]
    chosen = want.argmax(-1).tolist()
    want = eager_logits(model, cache, chosen, nxt, cuda_device)
    with no_device_waits():
        logits = graphs.run(chosen, nxt, 8)
    assert_same_step(logits.clone(), want, model.dtype, "the step after")


def test_a_spent_budget_skips_the_smaller_buckets(model, cuda_device, caplog):
    cache, extents, ids = prefilled(model, cuda_device)
    with caplog.at_level(logging.WARNING, logger="workers.model.cuda_graph_capture"):
        graphs = capture_decode_graphs(model, cache, scratch_block=SCRATCH, max_num_seqs=64,
                                       budget=CaptureBudget(max_seconds=1e-9))
    assert graphs.buckets == (64,)  # the largest is always captured
    assert "skipping batch sizes [32, 16, 8, 4, 2, 1]" in caplog.text and "time budget" in caplog.text
    assert graphs.step_bucket(extents[:1]) == 64
    want = eager_logits(model, cache, ids[:1], extents[:1], cuda_device)
    got = graphs.run(ids[:1], extents[:1], 64).clone()
    assert_same_step(got, want, model.dtype, "1 sequence in bucket 64")


# Engine level: fp32, test_engine.py's checkpoint and config.

@pytest.fixture(scope="module")
def tiny_dir(cuda_device, tmp_path_factory):
    out = tmp_path_factory.mktemp("graph_engine_gpu")
    save_hf_mixtral(out, num_hidden_layers=2, sliding_window=24, max_position_embeddings=512)
    return out


def cuda_engine(model_dir, device, **overrides):
    config = EngineConfig(**{**BASE, **overrides})
    return build_local_engine(model_dir, config, dtype="float32", device=device)


def test_engine_captures_at_build_and_enforce_eager_does_not(tiny_dir, cuda_device):
    engine = cuda_engine(tiny_dir, cuda_device)
    runner = engine.executor.runner
    assert runner.decode_graphs is not None
    assert runner.decode_graphs.buckets == decode_buckets(BASE["max_num_seqs"])
    assert runner.kv_cache.num_blocks == BASE["num_kv_blocks"] + 1  # the scratch block
    eager = cuda_engine(tiny_dir, cuda_device, enforce_eager=True)
    assert eager.executor.runner.decode_graphs is None
    assert eager.executor.runner.kv_cache.num_blocks == BASE["num_kv_blocks"]


def test_graph_engine_equals_eager_engine(tiny_dir, cuda_device):
    reqs = workload()  # two arrivals a step: batches of many sizes, most padded
    eager = run_requests(cuda_engine(tiny_dir, cuda_device, enforce_eager=True), reqs)
    engine = cuda_engine(tiny_dir, cuda_device)
    graphed = run_requests(engine, reqs)
    assert [r["token_ids"] for r in graphed] == [r["token_ids"] for r in eager]
    assert len(engine.executor.runner.decode_graphs.runs_per_bucket) > 1


def test_graph_engine_across_preemption(tiny_dir, cuda_device):
    reqs = [(p, sp, 0) for p, sp, _ in workload(12, seed=11)]
    roomy = run_requests(cuda_engine(tiny_dir, cuda_device, enforce_eager=True), reqs)
    # 20 blocks of 4 tokens cannot hold 12 sequences of up to 64 tokens at once.
    engine = cuda_engine(tiny_dir, cuda_device, num_kv_blocks=20)
    tight = run_requests(engine, reqs)
    assert engine.stats().num_preemptions > 0
    assert sum(engine.executor.runner.decode_graphs.runs_per_bucket.values()) > 0
    assert [r["token_ids"] for r in tight] == [r["token_ids"] for r in roomy]
    assert engine.stats().num_kv_blocks_used == 0


def test_graph_engine_across_an_abort(tiny_dir, cuda_device):
    greedy = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def abort_then_another(engine):
        stream = engine.generate("a", list(range(3, 40)), greedy)
        first = []
        async for out in stream:
            first += out.token_ids
            if len(first) >= 3:
                break
        await stream.aclose()  # what a disconnecting client does
        stats = engine.stats()
        other = await collect(engine, "b", [5, 6, 7], short)
        await engine.shutdown()
        return first[:3], stats, other["token_ids"]

    engine = cuda_engine(tiny_dir, cuda_device)
    first, stats, other = asyncio.run(abort_then_another(engine))
    assert stats.num_kv_blocks_used == 0 and stats.num_running == 0
    eager_first, _, eager_other = asyncio.run(abort_then_another(cuda_engine(tiny_dir, cuda_device,
                                                                             enforce_eager=True)))
    assert first == eager_first and other == eager_other and len(other) == 12
    assert sum(engine.executor.runner.decode_graphs.runs_per_bucket.values()) >= 11
