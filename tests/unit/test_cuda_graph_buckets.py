"""Decode graph buckets and the capture budget: pure decisions, no device."""

from __future__ import annotations

import pytest

from workers.model.attention_metadata import SeqExtent
from workers.model.cuda_graph_buckets import (
    DEFAULT_BUCKET_SIZES,
    bucket_for,
    decode_buckets,
    decode_step_bucket,
)
from workers.model.cuda_graph_budget import CaptureBudget


@pytest.mark.parametrize(("max_num_seqs", "want"), [
    (64, (1, 2, 4, 8, 16, 32, 64)),
    (48, (1, 2, 4, 8, 16, 32, 48)),  # the cap is a bucket: every batch up to it fits
    (1, (1,)),
    (3, (1, 2, 3)),
    (1000, DEFAULT_BUCKET_SIZES),  # never past the largest size
])
def test_buckets_are_capped_by_max_num_seqs(max_num_seqs, want):
    assert decode_buckets(max_num_seqs) == want


def test_buckets_from_custom_sizes_are_sorted_and_unique():
    assert decode_buckets(10, [8, 1, 4, 4]) == (1, 4, 8)
    assert decode_buckets(6, [8, 1, 4]) == (1, 4, 6)


@pytest.mark.parametrize(("max_num_seqs", "sizes"), [(0, DEFAULT_BUCKET_SIZES), (4, []), (4, [0, 2])])
def test_buckets_reject_nonsense(max_num_seqs, sizes):
    with pytest.raises(ValueError):
        decode_buckets(max_num_seqs, sizes)


@pytest.mark.parametrize(("n", "want"), [(0, None), (1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, None)])
def test_a_batch_pads_up_to_the_smallest_bucket_that_holds_it(n, want):
    assert bucket_for(n, (1, 2, 4, 8)) == want


def test_only_captured_buckets_count():
    # Buckets skipped by the budget: a batch of 1 pads up to the smallest one captured.
    assert bucket_for(1, (64, 128)) == 64


def decode(ctx: int) -> SeqExtent:
    return SeqExtent(ctx - 1, 1, tuple(range(ctx // 4 + 1)))


def test_step_bucket_takes_pure_decode_steps_only():
    buckets = (1, 2, 4)
    assert decode_step_bucket([decode(5), decode(9), decode(2)], buckets, max_context_len=16) == 4
    assert decode_step_bucket([decode(5), SeqExtent(0, 3, (0,))], buckets, 16) is None  # a prefill chunk
    assert decode_step_bucket([decode(5), decode(17)], buckets, 16) is None  # past the static table
    assert decode_step_bucket([decode(16)], buckets, 16) == 1  # a context filling the table fits
    assert decode_step_bucket([decode(3)] * 5, buckets, 16) is None  # larger than every bucket
    assert decode_step_bucket([], buckets, 16) is None  # nothing to replay


def test_capture_budget_says_which_limit_is_spent():
    budget = CaptureBudget(max_seconds=10, max_bytes=1 << 30)
    assert budget.spent(9.9, (1 << 30) - 1) is None
    assert "time" in budget.spent(10.0, 0)
    assert "memory" in budget.spent(1.0, 1 << 30)
    with pytest.raises(ValueError):
        CaptureBudget(max_seconds=0)
