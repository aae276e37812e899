"""The engine: continuous batching, paged KV, chunked prefill, preemption, sampling, stops.

Every test runs twice: on the single-process engine ("local") and, unchanged, on an
expert-parallel Ray worker group of 2 attention + 2 expert workers ("ray"), where a
request that runs alone leaves one attention worker with no sequences at all.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from cluster.distributed_engine import build_group_spec
from cluster.engine import Engine
from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from cluster.topology import TopologyConfig
from tests.engine_helpers import collect, run_requests
from tests.model_helpers import save_hf_mixtral
from workers.model.sampling_params import SamplingParams
from workers.weights.config import ModelConfig

VOCAB = 101


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_model")
    hf = save_hf_mixtral(out, num_hidden_layers=2, sliding_window=24, max_position_embeddings=512)
    return out, hf


BASE = dict(max_num_seqs=32, max_num_batched_tokens=256, block_size=4, num_kv_blocks=256)


@pytest.fixture(scope="module")
def ray_group(tiny_dir):
    import ray

    from cluster.ray_executor import RayExecutor

    model_dir, _ = tiny_dir
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    topo = TopologyConfig(num_attention_workers=2, num_expert_workers=2, num_cpus_per_worker=0.1)
    spec = build_group_spec(model_dir, ModelConfig.from_dir(model_dir),
                            EngineConfig(**BASE, num_attention_workers=2), topo)
    group = RayExecutor(spec, topo)
    yield group
    group.shutdown()
    ray.shutdown()


@pytest.fixture(params=["local", "ray", "ray-exact"])
def engine_for(request, tiny_dir):
    """A factory of fresh engines; on "ray" every engine drives the same worker group, its small
    decode steps through low-latency dispatch; "ray-exact" the same group, always exact."""
    model_dir, hf = tiny_dir
    if request.param == "local":
        def make(_model_dir, **overrides):
            return build_local_engine(model_dir, EngineConfig(**{**BASE, **overrides}))
        return make
    group = request.getfixturevalue("ray_group")

    def make_ray(_model_dir, **overrides):
        mode = {"low_latency_max_tokens": 0} if request.param == "ray-exact" else {}
        cfg = EngineConfig(**{**BASE, **overrides, **mode, "num_attention_workers": 2})
        assert cfg.num_kv_blocks <= BASE["num_kv_blocks"] and cfg.block_size == BASE["block_size"]
        return Engine(group, cfg, max_model_len=hf.config.max_position_embeddings,
                      eos_token_ids=(hf.config.eos_token_id,))
    return make_ray


def workload(n: int = 16, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=0.0, ignore_eos=True)
        reqs.append((prompt, params, i // 2))  # two new arrivals every step
    return reqs


def alone(engine_for, model_dir, prompt, params, **overrides):
    return run_requests(engine_for(model_dir, **overrides), [(prompt, params, 0)])[0]


def test_batch_invariance_greedy(tiny_dir, engine_for):
    model_dir, _ = tiny_dir
    reqs = workload()
    batched = run_requests(engine_for(model_dir), reqs)
    for (prompt, params, _), got in zip(reqs, batched, strict=True):
        assert len(got["token_ids"]) == params.max_tokens
        assert got["token_ids"] == alone(engine_for, model_dir, prompt, params)["token_ids"]


def test_same_seed_same_tokens_alone_and_in_batch(tiny_dir, engine_for):
    model_dir, _ = tiny_dir
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = [7, 8, 9, 10]
    reqs = workload(8, seed=3)
    reqs = [(p, SamplingParams(max_tokens=sp.max_tokens, temperature=1.0, ignore_eos=True), s)
            for p, sp, s in reqs]
    batched = run_requests(engine_for(model_dir), [*reqs[:4], (prompt, params, 1), *reqs[4:]])
    single = alone(engine_for, model_dir, prompt, params)
    assert batched[4]["token_ids"] == single["token_ids"]
    other_seed = alone(engine_for, model_dir, prompt,
                       SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True))
    assert other_seed["token_ids"] != single["token_ids"]


def test_greedy_equals_hf_generate_for_a_batch(tiny_dir, engine_for):
    model_dir, hf = tiny_dir
    rng = random.Random(5)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 3, 8, 17, 30)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    got = run_requests(engine_for(model_dir), [(p, params, 0) for p in prompts])
    for prompt, out in zip(prompts, got, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out["token_ids"] == ref


def test_preemption_keeps_outputs(tiny_dir, engine_for):
    model_dir, _ = tiny_dir
    reqs = [(p, sp, 0) for p, sp, _ in workload(12, seed=11)]
    roomy = run_requests(engine_for(model_dir), reqs)
    # 20 blocks of 4 tokens cannot hold 12 sequences of up to 64 tokens at once.
    engine = engine_for(model_dir, num_kv_blocks=20)
    tight = run_requests(engine, reqs)
    assert engine.stats().num_preemptions > 0
    assert [r["token_ids"] for r in tight] == [r["token_ids"] for r in roomy]
    assert engine.stats().num_kv_blocks_used == 0


def test_chunked_prefill_equals_unchunked(tiny_dir, engine_for):
    model_dir, _ = tiny_dir
    prompt = list(range(3, 100))  # 97 tokens
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)
    whole = alone(engine_for, model_dir, prompt, params, max_num_batched_tokens=256)
    chunked = alone(engine_for, model_dir, prompt, params, max_num_batched_tokens=32, max_num_seqs=8)
    assert chunked["token_ids"] == whole["token_ids"]
    torch.testing.assert_close(torch.tensor(chunked["logprobs"]), torch.tensor(whole["logprobs"]),
                               rtol=0, atol=1e-4)


def test_abort_mid_stream_frees_blocks(tiny_dir, engine_for):
    model_dir, _ = tiny_dir
    engine = engine_for(model_dir)

    async def main():
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        stream = engine.generate("a", list(range(3, 40)), params)
        seen = 0
        async for out in stream:
            seen += len(out.token_ids)
            if seen == 3:
                break
        await stream.aclose()  # what a disconnecting client does
        stats = engine.stats()
        other = await collect(engine, "b", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0))
        await engine.shutdown()
        return stats, other

    stats, other = asyncio.run(main())
    assert stats.num_kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert len(other["token_ids"]) >= 1


def test_too_long_request_is_rejected_with_a_clear_error(tiny_dir, engine_for):
    model_dir, _ = tiny_dir
    engine = engine_for(model_dir, num_kv_blocks=4)

    async def main():
        with pytest.raises(ValueError, match="context length|exceeds"):
            async for _ in engine.generate("x", list(range(3, 30)), SamplingParams(max_tokens=10)):
                pass

    asyncio.run(main())
