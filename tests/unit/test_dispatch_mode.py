"""The per-step choice between exact and low-latency dispatch."""

from __future__ import annotations

from cluster.dispatch_mode import low_latency_tokens, with_dispatch_mode
from workers.model.batch_spec import ScheduledBatch, ScheduledSeq
from workers.model.sampling_params import SamplingParams


def seq(seq_id: int, num_new: int) -> ScheduledSeq:
    return ScheduledSeq(seq_id, tuple(range(5, 5 + num_new)), 10, (0, 1), True, SamplingParams(), 3)


def batch(*num_new: int) -> ScheduledBatch:
    return ScheduledBatch(tuple(seq(i, n) for i, n in enumerate(num_new)))


def test_small_decode_steps_go_low_latency_sized_for_the_busiest_worker():
    assert low_latency_tokens((batch(1, 1, 1), batch(1)), max_tokens=16) == 3
    assert low_latency_tokens((batch(1), batch()), max_tokens=16) == 1  # an idle worker still joins


def test_prefill_large_or_empty_steps_go_exact():
    assert low_latency_tokens((batch(1, 4),), max_tokens=16) is None  # a prefill chunk in the step
    assert low_latency_tokens((batch(*[1] * 17),), max_tokens=16) is None  # past the threshold
    assert low_latency_tokens((batch(), batch()), max_tokens=16) is None
    assert low_latency_tokens((batch(1),), max_tokens=0) is None  # off


def test_every_batch_carries_the_same_mode():
    out = with_dispatch_mode((batch(1, 1), batch(1)), max_tokens=8)
    assert [b.low_latency_tokens for b in out] == [2, 2]
    assert [b.seqs for b in out] == [batch(1, 1).seqs, batch(1).seqs]
    exact = (batch(3),)
    assert with_dispatch_mode(exact, max_tokens=8) is exact
