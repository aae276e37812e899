"""A decode step on a GPU keeps its tensors there: host-built metadata arrives in a few copies per
step (not per layer), and no compute op mixes a CPU tensor with a GPU one."""

from __future__ import annotations

import pytest
import torch

from tests.unit.step_on_device import run_one_step

pytestmark = pytest.mark.gpu

# The step's uploads: the metadata buffer, the token ids, the rows to sample from, and the
# sampler's per-row parameters and uniforms (temperature, top-k, top-p, min-p, u, rows) for the
# one stochastic row. The demo model has 4 layers: a per-layer upload would blow through this.
MAX_UPLOADS_PER_STEP = 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_keeps_its_tensors_on_the_gpu(cuda_device, demo_model_dir, dtype):
    audit = run_one_step(demo_model_dir, cuda_device, dtype)
    assert audit.mixed() == []
    assert audit.copies_into("cuda") <= MAX_UPLOADS_PER_STEP
    assert audit.ops_on("cuda") > audit.ops_on("cpu")
