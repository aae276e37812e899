"""Padding a decode step to its bucket is inert: the padded step run eagerly on the CPU gives the
unpadded eager step's ids and logits (to rounding), and writes the KV cache only where the real
rows do, plus the scratch block. On CUDA a graph replays exactly this forward
(tests/gpu/test_cuda_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import save_hf_mixtral
from workers.model.attention_metadata import AttentionMetadata, SeqExtent
from workers.model.batch_spec import ScheduledBatch, ScheduledSeq
from workers.model.cuda_graph_runner import DecodeGraphRunner
from workers.model.kv_cache import KVCache
from workers.model.loader import load_local_model
from workers.model.runner import ModelRunner
from workers.model.sampling_params import SamplingParams

P = 4
NUM_BLOCKS = 40
SCRATCH = NUM_BLOCKS  # one block past those any sequence gets
PROMPTS = [[5, 9, 13], [7] * 11, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [42]]
# Shuffled, disjoint block tables of 8 blocks (32 tokens) each.
TABLES = [tuple(range(i, NUM_BLOCKS, 5))[:8] for i in range(4)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph_padding_model")
    save_hf_mixtral(out, num_hidden_layers=2, sliding_window=9, max_position_embeddings=64)
    return load_local_model(out)


def prefilled_cache(model) -> tuple[KVCache, list[int]]:
    """Every prompt prefilled (eagerly, in one step) into a cache with a scratch block; their first ids."""
    cache = KVCache(model.cfg, NUM_BLOCKS + 1, P)
    runner = ModelRunner(model, cache)
    greedy = SamplingParams(max_tokens=8)
    out = runner.execute(ScheduledBatch(tuple(
        ScheduledSeq(i, tuple(p), 0, TABLES[i], True, greedy, 0) for i, p in enumerate(PROMPTS))))
    return cache, list(out.token_ids)


def eager_logits(model, cache, ids, extents):
    meta = AttentionMetadata.build(extents, P)
    return model.logits(model.forward(torch.tensor(ids), meta, cache))


def snapshot(cache: KVCache) -> list[torch.Tensor]:
    return [t.clone() for t in cache.k_BPGD + cache.v_BPGD]


def restore(cache: KVCache, saved: list[torch.Tensor]) -> None:
    for t, s in zip(cache.k_BPGD + cache.v_BPGD, saved, strict=True):
        t.copy_(s)


@pytest.mark.parametrize(("num_seqs", "bucket"), [(1, 1), (1, 4), (3, 4), (4, 4), (4, 8)])
def test_padded_step_equals_the_unpadded_eager_step(model, num_seqs, bucket):
    cache, first = prefilled_cache(model)
    extents = [SeqExtent(len(p), 1, TABLES[i]) for i, p in enumerate(PROMPTS[:num_seqs])]
    ids = first[:num_seqs]
    before = snapshot(cache)
    want = eager_logits(model, cache, ids, extents)
    after_eager = snapshot(cache)
    restore(cache, before)

    graphs = DecodeGraphRunner.eager(model, cache, scratch_block=SCRATCH, max_num_seqs=8, sizes=(1, 4, 8))
    assert graphs.step_bucket(extents) == (1 if num_seqs == 1 else 4)
    got = graphs.run(ids, extents, bucket)
    assert got.shape == want.shape
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The cache differs from the eager step's only in the scratch block (and by rounding: a matmul
    # of 4 rows may take another CPU kernel than one of 1).
    for t, e in zip(cache.k_BPGD + cache.v_BPGD, after_eager, strict=True):
        torch.testing.assert_close(t[:SCRATCH], e[:SCRATCH], rtol=1e-5, atol=1e-5)
    touched = any(bool(t[SCRATCH].abs().sum()) for t in cache.k_BPGD)
    assert touched == (bucket > num_seqs)


def test_padding_rows_attend_nothing_and_their_tokens_do_not_matter(model):
    """Whatever the padding rows hold, the real rows' logits are the same (nothing mixes rows)."""
    cache, first = prefilled_cache(model)
    extents = [SeqExtent(len(p), 1, TABLES[i]) for i, p in enumerate(PROMPTS[:2])]
    graphs = DecodeGraphRunner.eager(model, cache, scratch_block=SCRATCH, max_num_seqs=8, sizes=(8,))
    a = graphs.run(first[:2], extents, 8).clone()
    with torch.inference_mode():  # the buffers are inference tensors
        graphs.inputs.token_ids_R[2:].fill_(77)  # padding tokens changed behind the runner's back
        graphs.inputs.positions_R[2:].fill_(5)
    b = graphs.steps[8]()[:2]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_runner_with_padded_decode_generates_what_the_eager_runner_does(model):
    """Prefill eagerly, then 12 decode steps through each runner; greedy and seeded sampling."""
    params = [SamplingParams(max_tokens=16), SamplingParams(max_tokens=16, temperature=0.8, seed=3),
              SamplingParams(max_tokens=16), SamplingParams(max_tokens=16, temperature=1.0, top_k=5, seed=8)]

    def generate(with_graphs: bool) -> tuple[list[list[int]], DecodeGraphRunner | None]:
        cache = KVCache(model.cfg, NUM_BLOCKS + 1, P)
        graphs = (DecodeGraphRunner.eager(model, cache, scratch_block=SCRATCH, max_num_seqs=4)
                  if with_graphs else None)
        runner = ModelRunner(model, cache, graphs)
        out = runner.execute(ScheduledBatch(tuple(
            ScheduledSeq(i, tuple(p), 0, TABLES[i], True, params[i], 0) for i, p in enumerate(PROMPTS))))
        tokens = [[t] for t in out.token_ids]
        for step in range(1, 12):
            live = [i for i in range(4) if not (i == 3 and step > 6)]  # sequence 3 finishes early
            out = runner.execute(ScheduledBatch(tuple(
                ScheduledSeq(i, (tokens[i][-1],), len(PROMPTS[i]) + step - 1, TABLES[i], True, params[i],
                             step)
                for i in live)))
            assert list(out.seq_ids) == live
            for i, t in zip(live, out.token_ids, strict=True):
                tokens[i].append(t)
        return tokens, graphs

    eager, _ = generate(False)
    padded, graphs = generate(True)
    assert padded == eager
    # Four sequences ran in bucket 4; three (after one finished) padded up to 4 as well.
    assert graphs.runs_per_bucket == {4: 11}
