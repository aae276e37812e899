"""Fixtures of the CUDA checks (`make test-gpu`, docs/gpu.md).

Every test in this directory is marked `gpu` and takes `cuda_device`, directly or through a
fixture that does, before any expensive fixture: where CUDA is absent the whole directory skips
with the reason and costs only its imports. Ray is imported only by the fixtures that need it,
so the single-process checks run on a GPU machine without Ray too.
"""

from __future__ import annotations

import pytest
import torch


def cuda_absent_reason() -> str | None:
    """Why CUDA tests cannot run here, or None when they can."""
    if torch.version.cuda is None:
        return f"CUDA is absent: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"CUDA is absent: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return None


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    """The first visible GPU, with fp32 matmuls in full fp32 (no TF32), or a skip with the reason."""
    reason = cuda_absent_reason()
    if reason is not None:
        pytest.skip(reason)
    # The oracle comparisons (<= 1e-4 against transformers in fp32) do not hold with TF32 matmuls,
    # which round their inputs to 10 mantissa bits.
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


@pytest.fixture(scope="module")
def ray_on_gpu(cuda_device):
    """A one-node Ray on loopback that owns this machine's first GPU (the workers take fractions)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (the device runner carries it as wheels)")
    ray.init(address="local", num_cpus=8, num_gpus=1, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
