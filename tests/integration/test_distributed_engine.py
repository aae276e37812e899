"""The expert-parallel engine on Ray equals the single-process engine."""

from __future__ import annotations

import random

import pytest
import torch

from cluster.distributed_engine import build_distributed_engine
from cluster.engine_config import EngineConfig
from cluster.expert_parallel_config import ExpertParallelConfig
from cluster.local_engine import build_local_engine
from cluster.topology import TopologyConfig
from tests.engine_helpers import run_requests
from tests.model_helpers import save_hf_mixtral
from workers.model.sampling_params import SamplingParams

VOCAB = 101


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_model")
    save_hf_mixtral(out, num_hidden_layers=2, num_local_experts=8, max_position_embeddings=512)
    return out


def engine_cfg(num_attention_workers=1, **kw):
    base = dict(max_num_seqs=16, max_num_batched_tokens=64, block_size=4, num_kv_blocks=128,
                num_attention_workers=num_attention_workers)
    base.update(kw)
    return EngineConfig(**base)


def requests(n=6, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))]
        out.append((prompt, SamplingParams(max_tokens=rng.randint(2, 10), temperature=0.0,
                                           ignore_eos=True, logprobs=True), i // 2))
    out.append((list(range(3, 90)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                   logprobs=True), 0))  # longer than one chunk
    return out


@pytest.fixture(scope="module")
def reference(model_dir):
    return run_requests(build_local_engine(model_dir, engine_cfg()), requests())


CASES = {
    "1attn_2exp": (1, 2, {}),
    "2attn_4exp": (2, 4, {}),
    "2attn_3exp_uneven": (2, 3, {}),
    "1attn_3exp_replicated": (1, 3, {(0, 0): 2, (1, 5): 3, (1, 2): 2}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_distributed_equals_single_process(ray_local, model_dir, reference, case):
    num_attn, num_exp, replicas = CASES[case]
    topo = TopologyConfig(num_attention_workers=num_attn, num_expert_workers=num_exp, num_cpus_per_worker=0.1)
    engine, group = build_distributed_engine(model_dir, engine_cfg(num_attn), topo,
                                             expert_parallel=ExpertParallelConfig(expert_replicas=replicas))
    try:
        got = run_requests(engine, requests())
        for want, have in zip(reference, got, strict=True):
            assert have["token_ids"] == want["token_ids"]
            torch.testing.assert_close(torch.tensor(have["logprobs"]), torch.tensor(want["logprobs"]),
                                       rtol=0, atol=1e-4)
        stats = group.dispatch_stats()
        assert [s.rank for s in stats] == list(range(num_attn + num_exp))
        experts = [s for s in stats if s.kind == "expert"]
        assert all(s.busy_seconds > 0 and s.num_steps > 0 for s in experts)
        # Every routed assignment reached exactly one expert copy: top-2 of every computed token.
        computed = sum(s.dispatch.tokens_per_expert.get((0, e), 0) for s in experts for e in range(8))
        assert computed > 0 and computed % 2 == 0
        assert all(s.dispatch.dispatch_bytes_sent > 0 for s in stats if s.kind == "attention")
    finally:
        group.shutdown()
