"""Expert-pool autoscaling: hysteresis, one step at a time, bounds, checked by example and by replay."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.elastic_config import ExpertAutoscalingConfig
from cluster.expert_scaling_policy import ScalingDecision, ScalingState, bounded_target, decide_scale

CFG = ExpertAutoscalingConfig(enabled=True, min_workers=2, max_workers=4, upscale_busy=0.6,
                              downscale_busy=0.2, upscale_delay_s=10.0, downscale_delay_s=30.0)


def step(state: ScalingState, now: float, busy: float | None, num_workers: int = 3) -> ScalingDecision:
    return decide_scale(CFG, state, now, busy, num_workers, initial_workers=3)


def test_scales_up_only_after_the_delay():
    d = step(ScalingState(), 0.0, 0.9)
    assert (d.target, d.state) == (3, ScalingState(above_since=0.0))
    d = step(d.state, 9.9, 0.7)
    assert (d.target, d.state) == (3, ScalingState(above_since=0.0))
    d = step(d.state, 10.0, 0.8)
    assert (d.target, d.state) == (4, ScalingState())
    assert "3 → 4" in d.reason


def test_a_break_restarts_the_delay():
    d = step(ScalingState(), 0.0, 0.9)
    d = step(d.state, 5.0, 0.5)  # back inside the band
    assert (d.target, d.state) == (3, ScalingState())
    d = step(d.state, 12.0, 0.9)
    assert (d.target, d.state) == (3, ScalingState(above_since=12.0))
    d = step(d.state, 13.0, None)  # a gap in the data counts as a break too
    assert (d.target, d.state) == (3, ScalingState())
    # Crossing from busy to idle swaps one condition for the other.
    d = step(ScalingState(above_since=0.0), 4.0, 0.1)
    assert (d.target, d.state) == (3, ScalingState(below_since=4.0))


def test_scales_down_after_its_own_delay():
    d = step(ScalingState(), 100.0, 0.1)
    d = step(d.state, 129.0, 0.05)
    assert d.target == 3
    d = step(d.state, 130.0, 0.19)
    assert (d.target, d.state) == (2, ScalingState())
    assert "3 → 2" in d.reason


def test_stays_at_the_bounds_and_keeps_counting():
    d = step(ScalingState(above_since=0.0), 50.0, 1.0, num_workers=4)
    assert (d.target, d.state) == (4, ScalingState(above_since=0.0))
    assert "max 4" in d.reason
    d = step(ScalingState(below_since=0.0), 50.0, 0.0, num_workers=2)
    assert (d.target, d.state) == (2, ScalingState(below_since=0.0))
    assert "min 2" in d.reason


def test_outside_the_bounds_moves_back_at_once():
    for busy in (None, 0.0, 0.5, 1.0):
        assert step(ScalingState(above_since=0.0), 1.0, busy, num_workers=1).target == 2
        assert step(ScalingState(below_since=0.0), 1.0, busy, num_workers=7).target == 4
    d = step(ScalingState(above_since=0.0), 1.0, 0.9, num_workers=9)
    assert d.state == ScalingState() and "outside the bounds" in d.reason


def test_thresholds_are_strict_and_bounds_default_to_the_starting_size():
    assert step(ScalingState(above_since=0.0), 100.0, 0.6).target == 3
    assert step(ScalingState(below_since=0.0), 100.0, 0.2).target == 3
    fixed = ExpertAutoscalingConfig(enabled=True, upscale_delay_s=0.0, downscale_delay_s=0.0)
    assert decide_scale(fixed, ScalingState(), 0.0, 1.0, 3, initial_workers=3).target == 3
    assert decide_scale(fixed, ScalingState(), 0.0, 0.0, 3, initial_workers=3).target == 3
    assert [bounded_target(CFG, 3, n) for n in (0, 3, 9)] == [2, 3, 4]


def test_an_unset_bound_never_crosses_the_set_one():
    assert ExpertAutoscalingConfig().bounds(4) == (4, 4)
    assert ExpertAutoscalingConfig(max_workers=3).bounds(4) == (3, 3)
    assert ExpertAutoscalingConfig(max_workers=6).bounds(4) == (4, 6)
    assert ExpertAutoscalingConfig(min_workers=5).bounds(4) == (5, 5)
    assert ExpertAutoscalingConfig(min_workers=2).bounds(4) == (2, 4)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="go back"):
        step(ScalingState(above_since=5.0), 4.0, 0.9)
    with pytest.raises(ValueError, match="at least one"):
        step(ScalingState(), 0.0, 0.5, num_workers=0)


configs = st.builds(
    ExpertAutoscalingConfig,
    enabled=st.just(True),
    min_workers=st.none() | st.integers(1, 3),
    max_workers=st.none() | st.integers(3, 6),
    upscale_busy=st.sampled_from([0.5, 0.6, 0.9, 1.0]),
    downscale_busy=st.sampled_from([0.0, 0.1, 0.3]),
    upscale_delay_s=st.sampled_from([0.0, 3.0, 10.0]),
    downscale_delay_s=st.sampled_from([0.0, 5.0, 20.0]),
)
observations = st.lists(st.tuples(st.sampled_from([0.0, 1.0, 2.0, 4.0]),
                                  st.none() | st.sampled_from([0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 1.0])),
                        min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(cfg=configs, initial=st.integers(1, 5), start=st.integers(1, 8), obs=observations)
def test_replayed_decisions_keep_bounds_and_wait_out_the_delay(cfg, initial, start, obs):
    """Replay a trace with the pool following each decision, against a recount of how long each held."""
    lo, hi = cfg.bounds(initial)
    num_workers, state, now = start, ScalingState(), 0.0
    above_from: float | None = None  # start of the current unbroken run, recounted here
    below_from: float | None = None
    for gap, busy in obs:
        now += gap
        d = decide_scale(cfg, state, now, busy, num_workers, initial)
        assert lo <= d.target <= hi
        if not lo <= num_workers <= hi:
            assert d.target == min(max(num_workers, lo), hi)
            above_from = below_from = None
        else:
            above = busy is not None and busy > cfg.upscale_busy
            below = busy is not None and busy < cfg.downscale_busy
            above_from = (now if above_from is None else above_from) if above else None
            below_from = (now if below_from is None else below_from) if below else None
            up_due = above_from is not None and now - above_from >= cfg.upscale_delay_s
            down_due = below_from is not None and now - below_from >= cfg.downscale_delay_s
            up_due, down_due = up_due and num_workers < hi, down_due and num_workers > lo
            assert d.target == num_workers + up_due - down_due
            if d.target != num_workers:
                above_from = below_from = None  # the resized pool must show the condition afresh
        assert d.state == ScalingState(above_since=above_from, below_since=below_from)
        num_workers, state = d.target, d.state
