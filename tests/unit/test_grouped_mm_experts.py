"""The grouped_mm experts path against the per-expert loop and the reference, on the CPU.

torch's CPU build runs `_grouped_mm` (fp32 and bf16) as a loop of matmuls, so the CUDA path's
arithmetic and layout (fused w1|w3, transposed views, device-side int32 offsets) are checked
here; tests/gpu/test_experts_gpu.py checks the CUDA kernel itself.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.experts_helpers import per_row_reference, random_experts, sorted_rows
from workers.moe.block import moe_block
from workers.moe.dispatcher import LocalDispatcher
from workers.moe.experts import (
    LayerExperts,
    _grouped_mm_is_sync_free,
    experts_impl_for,
    grouped_experts,
    reference_experts,
    run_experts,
)
from workers.moe.route import count_per_expert, route

HIDDEN, INTER = 32, 24  # 16-byte rows in fp32 and bf16

COUNTS = {
    "odd": [3, 1, 5, 7],
    "empty experts": [0, 4, 0, 2],
    "all on one expert": [0, 0, 9, 0],
    "all on the last": [0, 0, 0, 6],
    "one row": [1, 0, 0, 0],
    "no rows": [0, 0, 0, 0],
}


def grouped_mm_moe_block(x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int,
                         experts: LayerExperts) -> torch.Tensor:
    """moe.moe_block with its experts stage forced onto grouped_mm, whatever the device."""
    dispatcher = LocalDispatcher(len(experts.expert_ids))
    x_MH, plan = dispatcher.dispatch(0, x_TH, route(x_TH, gate_EH, top_k))
    return dispatcher.combine(0, run_experts("grouped_mm", x_MH, plan.expert_counts_E, experts), plan)


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_grouped_mm_equals_loop_and_reference_fp32(counts):
    experts = random_experts(4, HIDDEN, INTER)
    x, counts_E = sorted_rows(counts, HIDDEN)
    grouped = run_experts("grouped_mm", x, counts_E, experts)
    loop = run_experts("loop", x, counts_E, experts)
    assert grouped.shape == loop.shape == (sum(counts), HIDDEN) and grouped.dtype == torch.float32
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, per_row_reference(x, counts, experts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_grouped_mm_bf16_is_close_to_the_fp32_reference(counts):
    experts = random_experts(4, HIDDEN, INTER, dtype=torch.bfloat16)
    x, counts_E = sorted_rows(counts, HIDDEN, dtype=torch.bfloat16)
    grouped = run_experts("grouped_mm", x, counts_E, experts)
    loop = run_experts("loop", x, counts_E, experts)
    ref = per_row_reference(x, counts, experts)
    assert grouped.dtype == torch.bfloat16
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    # bf16 keeps 8 bits of mantissa; two roundings (h, then silu×up) on values of this size.
    torch.testing.assert_close(grouped.float(), ref, rtol=0.03, atol=0.03 * scale)
    torch.testing.assert_close(grouped.float(), loop.float(), rtol=0.03, atol=0.03 * scale)


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=7),
       shape=st.sampled_from([(16, 8), (32, 24), (8, 40)]))
def test_grouped_mm_equals_loop_on_random_counts(counts, shape):
    hidden, inter = shape
    experts = random_experts(len(counts), hidden, inter, seed=len(counts))
    x, counts_E = sorted_rows(counts, hidden, seed=sum(counts))
    torch.testing.assert_close(run_experts("grouped_mm", x, counts_E, experts),
                               run_experts("loop", x, counts_E, experts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 37])
def test_moe_block_through_grouped_mm_equals_the_default_and_the_reference(num_tokens):
    experts = random_experts(6, HIDDEN, INTER, seed=num_tokens)
    gate = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(3))
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(4))
    grouped = grouped_mm_moe_block(x, gate, 2, experts)
    default = moe_block(0, x, gate, 2, LocalDispatcher(6), experts)
    routing = route(x, gate, 2)
    ref = reference_experts(x, routing.topk_ids_TK, routing.topk_weights_TK, experts)
    assert grouped.shape == (num_tokens, HIDDEN)
    torch.testing.assert_close(grouped, default, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-5)


def test_the_cpu_runs_the_loop_whatever_the_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        experts = random_experts(2, HIDDEN, INTER, dtype=dtype)
        assert experts.grouped_mm_ready
        assert experts_impl_for(torch.zeros(3, HIDDEN, dtype=dtype), experts) == "loop"


def test_the_probe_finds_grouped_mm_on_this_cpu_torch():
    # What the CUDA choice relies on: the probe computes a grouped product and compares it.
    assert _grouped_mm_is_sync_free(torch.device("cpu"), torch.float32)
    assert not _grouped_mm_is_sync_free(torch.device("cpu"), torch.int64)  # no integer kernel


def test_unaligned_widths_fall_back_to_the_loop_and_refuse_grouped_mm():
    experts = random_experts(3, 17, 5)  # 68-byte and 20-byte rows
    assert not experts.grouped_mm_ready
    x, counts_E = sorted_rows([2, 0, 3], 17)
    assert experts_impl_for(x, experts) == "loop"
    want = per_row_reference(x, [2, 0, 3], experts)
    torch.testing.assert_close(grouped_experts(x, counts_E, experts), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not laid out for _grouped_mm"):
        run_experts("grouped_mm", x, counts_E, experts)


def test_a_non_contiguous_input_is_copied_not_misread():
    experts = random_experts(2, HIDDEN, INTER)
    wide = torch.randn(7, 2 * HIDDEN)
    x = wide[:, HIDDEN:]  # rows 2H apart, starting mid-row
    counts_E = torch.tensor([3, 4])
    torch.testing.assert_close(run_experts("grouped_mm", x, counts_E, experts),
                               run_experts("loop", x.contiguous(), counts_E, experts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_rows_past_the_counts_are_padding(impl):
    """A low-latency buffer's tail: the counted rows come out as without it."""
    experts = random_experts(3, HIDDEN, INTER)
    x, counts_E = sorted_rows([2, 0, 3], HIDDEN)
    padded = torch.cat([x, torch.zeros(4, HIDDEN)])
    torch.testing.assert_close(run_experts(impl, padded, counts_E, experts)[:5],
                               run_experts(impl, x, counts_E, experts), rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_refused():
    experts = random_experts(3, HIDDEN, INTER)
    x, counts_E = sorted_rows([1, 2, 3], HIDDEN)
    with pytest.raises(ValueError, match="unknown experts implementation"):
        run_experts("bmm", x, counts_E, experts)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="counts for 3 local experts"):
        run_experts("loop", x, counts_E[:2], experts)
    with pytest.raises(ValueError, match="add up to more than"):
        run_experts("loop", x, torch.tensor([1, 2, 4]), experts)
    with pytest.raises(ValueError, match="rows are"):
        run_experts("grouped_mm", x.bfloat16(), counts_E, experts)
    with pytest.raises(ValueError, match="w13 is"):
        LayerExperts((0,), experts.w13_EFH[:1], experts.w2_EHF[:1].bfloat16())


def test_local_dispatch_keeps_the_counts_on_the_rows_device():
    gate = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    x = torch.randn(11, HIDDEN, generator=torch.Generator().manual_seed(1))
    routing = route(x, gate, 2)
    x_M, plan = LocalDispatcher(5).dispatch(0, x, routing)
    assert plan.expert_counts_E.dtype == torch.int64 and plan.expert_counts_E.device == x.device
    want = torch.bincount(routing.topk_ids_TK.reshape(-1), minlength=5)
    assert plan.recv_expert_counts == tuple(want.tolist())
    assert all(type(n) is int for n in plan.recv_expert_counts) and sum(plan.recv_expert_counts) == 22
    assert x_M.shape == (22, HIDDEN)


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(0, 7), max_size=40), num_experts=st.integers(8, 11))
def test_count_per_expert_equals_bincount(ids, num_experts):
    ids_A = torch.tensor(ids, dtype=torch.int64)
    got = count_per_expert(ids_A, num_experts)
    assert got.dtype == torch.int64 and got.tolist() == torch.bincount(ids_A, minlength=num_experts).tolist()
    assert count_per_expert(ids_A.view(-1, 1), num_experts).tolist() == got.tolist()  # any shape


def test_pickling_ships_each_stack_once():
    experts = random_experts(8, 64, 128)
    blob = pickle.dumps(experts)
    weight_bytes = (experts.w13_EFH.numel() + experts.w2_EHF.numel()) * 4
    assert len(blob) < 1.2 * weight_bytes
    back = pickle.loads(blob)
    assert back.expert_ids == experts.expert_ids and back.grouped_mm_ready
    x, counts_E = sorted_rows([1, 0, 2, 0, 0, 3, 0, 1], 64)
    torch.testing.assert_close(grouped_experts(x, counts_E, back), grouped_experts(x, counts_E, experts),
                               rtol=0, atol=0)
