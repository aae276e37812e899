"""The single-process engine on CUDA (fp32, TF32 off): tests/integration/test_engine.py's cases, unchanged.

Batch invariance, seeds alone and in a batch, greedy ids equal to HF generate, preemption by
recompute and chunked prefill run here on an engine whose weights, KV cache, step metadata and
sampling live on the GPU; their bodies are the CPU tests' own, handed a CUDA engine factory.
"""

from __future__ import annotations

import pytest

from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from tests.integration import test_engine as cpu_cases
from tests.model_helpers import save_hf_mixtral

pytestmark = pytest.mark.gpu

CASES = (
    "test_batch_invariance_greedy",
    "test_same_seed_same_tokens_alone_and_in_batch",
    "test_greedy_equals_hf_generate_for_a_batch",  # HF runs on the CPU in fp32: the oracle
    "test_preemption_keeps_outputs",
    "test_chunked_prefill_equals_unchunked",
    "test_abort_mid_stream_frees_blocks",
)


@pytest.fixture(scope="module")
def tiny_dir(cuda_device, tmp_path_factory):
    """test_engine.py's checkpoint (same config and seed)."""
    out = tmp_path_factory.mktemp("engine_model_gpu")
    hf = save_hf_mixtral(out, num_hidden_layers=2, sliding_window=24, max_position_embeddings=512)
    return out, hf


@pytest.fixture
def cuda_engine_for(tiny_dir, cuda_device):
    """test_engine.py's `engine_for`, building single-process engines on the GPU."""
    model_dir, _ = tiny_dir

    def make(_model_dir, **overrides):
        config = EngineConfig(**{**cpu_cases.BASE, **overrides})
        engine = build_local_engine(model_dir, config, dtype="float32", device=cuda_device)
        runner = engine.executor.runner
        assert runner.kv_cache.k_BPGD[0].device == cuda_device
        assert runner.model.weights.embed_VH.device == cuda_device
        return engine
    return make


@pytest.mark.parametrize("case", CASES)
def test_engine_case_on_cuda(case, tiny_dir, cuda_engine_for):
    getattr(cpu_cases, case)(tiny_dir, cuda_engine_for)
