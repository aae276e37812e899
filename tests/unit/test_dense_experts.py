"""The capture-safe "dense" experts stage equals the reference; the CPU never takes it."""

from __future__ import annotations

import pytest
import torch

from tests.experts_helpers import per_row_reference, random_experts, sorted_rows
from workers.moe.experts import experts_impl_for, run_experts

COUNTS = {
    "odd": [3, 1, 5, 7, 0, 11, 2, 1],
    "empty experts": [0, 4, 0, 2, 0, 0, 9, 0],
    "all on one expert": [0, 0, 33, 0, 0, 0, 0, 0],
    "one row": [0, 0, 0, 0, 0, 0, 0, 1],
}
HIDDEN, INTER = 24, 40


@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_dense_equals_the_reference_and_the_loop(counts):
    experts = random_experts(8, HIDDEN, INTER)
    x, counts_E = sorted_rows(counts, HIDDEN)
    got = run_experts("dense", x, counts_E, experts)
    torch.testing.assert_close(got, per_row_reference(x, counts, experts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, run_experts("loop", x, counts_E, experts), rtol=1e-5, atol=1e-5)


def test_dense_padding_rows_take_the_last_expert_and_leave_real_rows_alone():
    counts = [2, 0, 3]
    experts = random_experts(3, HIDDEN, INTER)
    x, counts_E = sorted_rows(counts, HIDDEN)
    pad = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(9))
    got = run_experts("dense", torch.cat([x, pad]), counts_E, experts)
    torch.testing.assert_close(got[:5], run_experts("dense", x, counts_E, experts), rtol=1e-6, atol=1e-6)
    last = run_experts("loop", pad, torch.tensor([0, 0, 4]), experts)
    torch.testing.assert_close(got[5:], last, rtol=1e-5, atol=1e-5)


def test_dense_of_no_rows_is_empty():
    experts = random_experts(2, HIDDEN, INTER)
    got = run_experts("dense", torch.empty(0, HIDDEN), torch.zeros(2, dtype=torch.long), experts)
    assert got.shape == (0, HIDDEN)


def test_the_cpu_path_stays_the_loop():
    experts = random_experts(2, HIDDEN, INTER)
    assert experts_impl_for(torch.zeros(3, HIDDEN), experts) == "loop"
