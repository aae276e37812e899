"""How many expert workers a model group should have: a pure decision with hysteresis.

Read every `interval_s` with the pool's busy fraction (cluster/load_window.py). One worker more
once the pool has been busier than `upscale_busy` for `upscale_delay_s`, one fewer once it has
been idler than `downscale_busy` for `downscale_delay_s`, one step at a time and never outside
`cfg.bounds(initial_workers)`. The delays keep a short burst or lull from resizing the pool
(each resize moves expert weights and pauses the group); the gap between the two thresholds
keeps the pool from flapping around one of them.

The "since when" of each condition lives in a ScalingState the caller keeps and hands back
each time; the decision carries the next one. After a resize, or a gap in the data, the
state starts over: the new pool must show the condition afresh for the whole delay.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.elastic_config import ExpertAutoscalingConfig


@dataclass(frozen=True)
class ScalingState:
    above_since: float | None = None  # busy fraction above upscale_busy without a break since then
    below_since: float | None = None  # busy fraction below downscale_busy without a break since then


@dataclass(frozen=True)
class ScalingDecision:
    target: int  # expert workers the pool should have; the current number when nothing changes
    state: ScalingState  # hand this to the next decide_scale
    reason: str  # for logs and the plane's events


def bounded_target(cfg: ExpertAutoscalingConfig, initial_workers: int, target: int) -> int:
    """`target` clamped into cfg.bounds(initial_workers)."""
    lo, hi = cfg.bounds(initial_workers)
    return min(max(target, lo), hi)


def decide_scale(cfg: ExpertAutoscalingConfig, state: ScalingState, now: float, busy_fraction: float | None,
                 num_workers: int, initial_workers: int) -> ScalingDecision:
    """The pool size to aim for now. `cfg.enabled` is the caller's business; this only decides.

    "Above" and "below" are strict, so upscale_busy=1 never adds a worker and downscale_busy=0
    never removes one.
    """
    if num_workers < 1 or initial_workers < 1:
        raise ValueError(f"need at least one expert worker, got num_workers={num_workers}, "
                         f"initial_workers={initial_workers}")
    for since in (state.above_since, state.below_since):
        if since is not None and now < since:
            raise ValueError(f"now ({now}) is before the state's start ({since}); times must not go back")
    lo, hi = cfg.bounds(initial_workers)
    if not lo <= num_workers <= hi:
        target = bounded_target(cfg, initial_workers, num_workers)
        return ScalingDecision(target, ScalingState(),
                               f"{num_workers} expert workers outside the bounds [{lo}, {hi}]: to {target}")
    if busy_fraction is None:
        return ScalingDecision(num_workers, ScalingState(), "no busy fraction yet")

    if busy_fraction > cfg.upscale_busy:
        since = now if state.above_since is None else state.above_since
        held = now - since
        if held < cfg.upscale_delay_s:
            return ScalingDecision(num_workers, ScalingState(above_since=since),
                                   f"busy {busy_fraction:.2f} > {cfg.upscale_busy} for {held:.1f}s "
                                   f"of {cfg.upscale_delay_s}s")
        if num_workers >= hi:
            return ScalingDecision(num_workers, ScalingState(above_since=since),
                                   f"busy {busy_fraction:.2f} > {cfg.upscale_busy} but already at max {hi}")
        return ScalingDecision(num_workers + 1, ScalingState(),
                               f"busy {busy_fraction:.2f} > {cfg.upscale_busy} for {held:.1f}s: "
                               f"{num_workers} → {num_workers + 1} expert workers")

    if busy_fraction < cfg.downscale_busy:
        since = now if state.below_since is None else state.below_since
        held = now - since
        if held < cfg.downscale_delay_s:
            return ScalingDecision(num_workers, ScalingState(below_since=since),
                                   f"busy {busy_fraction:.2f} < {cfg.downscale_busy} for {held:.1f}s "
                                   f"of {cfg.downscale_delay_s}s")
        if num_workers <= lo:
            return ScalingDecision(num_workers, ScalingState(below_since=since),
                                   f"busy {busy_fraction:.2f} < {cfg.downscale_busy} but already at min {lo}")
        return ScalingDecision(num_workers - 1, ScalingState(),
                               f"busy {busy_fraction:.2f} < {cfg.downscale_busy} for {held:.1f}s: "
                               f"{num_workers} → {num_workers - 1} expert workers")

    return ScalingDecision(num_workers, ScalingState(),
                           f"busy {busy_fraction:.2f} within [{cfg.downscale_busy}, {cfg.upscale_busy}]")
