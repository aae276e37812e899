"""The engine's own cases (tests/integration/test_engine.py) with every pure decode step padded to a
bucket over the static buffers a graph reads, run eagerly on the CPU: batch invariance, seeds, HF's
greedy ids, preemption by recompute and an abort mid-stream all come out as without padding. The
same cases with real graph replay on CUDA: tests/gpu/test_cuda_graphs_gpu.py."""

from __future__ import annotations

from collections import Counter

import pytest

from cluster.engine import Engine
from cluster.engine_config import EngineConfig
from cluster.executor import LocalExecutor
from tests.integration import test_engine as cpu_cases
from tests.model_helpers import save_hf_mixtral
from workers.model.cuda_graph_runner import DecodeGraphRunner
from workers.model.kv_cache import KVCache
from workers.model.loader import load_local_model
from workers.model.runner import ModelRunner

CASES = (
    "test_batch_invariance_greedy",
    "test_same_seed_same_tokens_alone_and_in_batch",
    "test_greedy_equals_hf_generate_for_a_batch",
    "test_preemption_keeps_outputs",
    "test_abort_mid_stream_frees_blocks",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """test_engine.py's checkpoint (same config and seed)."""
    out = tmp_path_factory.mktemp("graph_engine_model")
    hf = save_hf_mixtral(out, num_hidden_layers=2, sliding_window=24, max_position_embeddings=512)
    return out, hf


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_local_model(tiny_dir[0])


@pytest.fixture
def padded_engine_for(tiny_dir, model):
    """test_engine.py's `engine_for`: single-process engines whose decode steps run padded."""
    _, hf = tiny_dir
    runners: list[DecodeGraphRunner] = []

    def make(_model_dir, **overrides):
        config = EngineConfig(**{**cpu_cases.BASE, **overrides})
        # One block more than the scheduler hands out: the padding rows' scratch block.
        kv_cache = KVCache(model.cfg, config.num_kv_blocks + 1, config.block_size)
        graphs = DecodeGraphRunner.eager(model, kv_cache, scratch_block=config.num_kv_blocks,
                                         max_num_seqs=config.max_num_seqs)
        runners.append(graphs)
        return Engine(LocalExecutor(ModelRunner(model, kv_cache, graphs)), config,
                      max_model_len=hf.config.max_position_embeddings,
                      eos_token_ids=(hf.config.eos_token_id,))
    make.runners = runners
    return make


@pytest.mark.parametrize("case", CASES)
def test_engine_case_with_padded_decode(case, tiny_dir, padded_engine_for):
    getattr(cpu_cases, case)(tiny_dir, padded_engine_for)
    served = sum((r.runs_per_bucket for r in padded_engine_for.runners), start=Counter())
    assert sum(served.values()) > 0, "no decode step went through the static buffers"
    if case == "test_batch_invariance_greedy":
        assert len(served) > 1  # batches of several sizes, padded up to several buckets
