"""The experts stage on CUDA: the grouped kernel against the reference, and a MoE layer that
never waits for the device (run by `make test-gpu`; every test skips where CUDA is absent).
"""

from __future__ import annotations

import pytest
import torch

from tests.experts_helpers import per_row_reference, random_experts, sorted_rows
from workers.moe.block import moe_block
from workers.moe.dispatcher import LocalDispatcher
from workers.moe.experts import experts_impl_for, grouped_experts, reference_experts, run_experts
from workers.moe.route import route

pytestmark = pytest.mark.gpu

COUNTS = {
    "odd": [3, 1, 5, 7, 0, 11, 2, 1],
    "empty experts": [0, 4, 0, 2, 0, 0, 9, 0],
    "all on one expert": [0, 0, 33, 0, 0, 0, 0, 0],
    "one row": [0, 0, 0, 0, 0, 0, 0, 1],
    "many": [130, 7, 0, 64, 255, 1, 17, 90],
}
HIDDEN, INTER = 256, 512


@pytest.fixture
def cuda(cuda_device) -> torch.device:
    """conftest's device (or its skip with the reason), fp32 matmuls in full fp32."""
    return cuda_device


def has_grouped_kernel(device: torch.device) -> bool:
    """Where torch has its bf16 grouped kernel today (sm90, sm100); elsewhere the loop is expected."""
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_grouped_mm_bf16_equals_the_reference(cuda, counts):
    experts = random_experts(8, HIDDEN, INTER, dtype=torch.bfloat16, device=cuda, scale=0.05)
    x, counts_E = sorted_rows(counts, HIDDEN, dtype=torch.bfloat16, device=cuda)
    got = run_experts("grouped_mm", x, counts_E, experts)
    ref = per_row_reference(x, counts, experts)
    loop = run_experts("loop", x, counts_E, experts)
    scale = float(ref.abs().max())
    assert got.dtype == torch.bfloat16 and got.device == cuda
    torch.testing.assert_close(got.float(), ref, rtol=0.03, atol=0.03 * scale)
    torch.testing.assert_close(got.float(), loop.float(), rtol=0.03, atol=0.03 * scale)


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_grouped_mm_fp32_equals_the_reference(cuda, counts):
    # fp32 goes through torch's fallback (a loop of matmuls); the layout and offsets are ours.
    experts = random_experts(8, HIDDEN, INTER, device=cuda, scale=0.05)
    x, counts_E = sorted_rows(counts, HIDDEN, device=cuda)
    got = run_experts("grouped_mm", x, counts_E, experts)
    torch.testing.assert_close(got, per_row_reference(x, counts, experts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, run_experts("loop", x, counts_E, experts), rtol=1e-5, atol=1e-5)


def test_the_choice_follows_the_tensors(cuda):
    bf16 = random_experts(2, HIDDEN, INTER, dtype=torch.bfloat16, device=cuda)
    x = torch.zeros(3, HIDDEN, dtype=torch.bfloat16, device=cuda)
    want = "grouped_mm" if has_grouped_kernel(cuda) else "loop"
    assert experts_impl_for(x, bf16) == want
    assert experts_impl_for(x.cpu(), bf16) == "loop"  # rows on another device: never the kernel
    odd = random_experts(2, 36, 20, dtype=torch.bfloat16, device=cuda)  # 72-byte rows
    assert experts_impl_for(torch.zeros(3, 36, dtype=torch.bfloat16, device=cuda), odd) == "loop"
    fp32 = random_experts(2, HIDDEN, INTER, device=cuda)
    # torch's fp32 grouped_mm copies the offsets to the host: the probe sees the sync.
    assert experts_impl_for(x.float(), fp32) == "loop"


@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])
def test_the_local_moe_block_never_waits_for_the_device(cuda, num_tokens):
    if not has_grouped_kernel(cuda):
        pytest.skip(f"{torch.cuda.get_device_name(cuda)} has no bf16 grouped kernel in this torch: "
                    "the loop path reads the counts back")
    experts = random_experts(8, HIDDEN, INTER, dtype=torch.bfloat16, device=cuda, scale=0.05)
    gate = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(5)).to(cuda, torch.bfloat16)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(6)).to(cuda, torch.bfloat16)
    dispatcher = LocalDispatcher(len(experts.expert_ids))
    warm = moe_block(0, x, gate, 2, dispatcher, experts)  # first-call set-up (cuBLAS handles, workspaces)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = moe_block(0, x, gate, 2, dispatcher, experts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, warm, rtol=0, atol=0)
    routing = route(x, gate, 2)
    ref = reference_experts(x.float(), routing.topk_ids_TK, routing.topk_weights_TK,
                            random_experts(8, HIDDEN, INTER, device=cuda, scale=0.05))
    scale = float(ref.abs().max())
    torch.testing.assert_close(got.float(), ref, rtol=0.03, atol=0.03 * scale)


def test_the_sync_check_would_see_a_sync(cuda):
    """The check above can fail: the loop's count read-back trips the same mode."""
    experts = random_experts(2, HIDDEN, INTER, dtype=torch.bfloat16, device=cuda)
    x, counts_E = sorted_rows([2, 3], HIDDEN, dtype=torch.bfloat16, device=cuda)
    run_experts("loop", x, counts_E, experts)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            run_experts("loop", x, counts_E, experts)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_full_width_layer_matches_the_reference(cuda):
    """Mixtral's real widths (4096 / 14336) in bf16: the path the benchmark times."""
    experts = random_experts(8, 4096, 14336, dtype=torch.bfloat16, device=cuda, scale=0.02)
    counts = [40, 0, 3, 129, 1, 0, 64, 19]
    x, counts_E = sorted_rows(counts, 4096, dtype=torch.bfloat16, device=cuda)
    got = grouped_experts(x, counts_E, experts)
    ref = per_row_reference(x, counts, experts)
    scale = float(ref.abs().max())
    torch.testing.assert_close(got.float(), ref, rtol=0.03, atol=0.03 * scale)
