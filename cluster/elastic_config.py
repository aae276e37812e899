"""How the expert plane of a running model group changes itself (issue 16): live rebalancing of
the expert placement and scaling of the expert-worker pool, each off by default.

Both are driven by cluster/expert_plane.py from the workers' stats, read every `interval_s`
(never per step); the decisions are pure functions (cluster/rebalance_policy.py,
cluster/expert_scaling_policy.py) of those stats and these knobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class RebalanceConfig:
    enabled: bool = False
    window_s: float = 30.0  # the sliding window of tokens per (layer, expert) the policy reads
    interval_s: float = 2.0  # how often the policy looks at the window
    threshold: float = 1.3  # imbalance (max / mean tokens per expert worker) that calls for a move
    min_gain: float = 0.1  # a move must cut the imbalance by at least this fraction of itself
    extra_copies_per_layer: int = 0  # replicas of the hottest experts a new placement may add per layer
    min_tokens: int = 256  # tokens in the window below which nothing is decided (too little to go on)
    cooldown_s: float = 10.0  # after a rebalance, the window must refill with the new placement's load

    def __post_init__(self) -> None:
        _finite(self)
        if self.window_s <= 0 or self.interval_s <= 0:
            raise ValueError("rebalance window_s and interval_s must be > 0")
        if self.threshold < 1:
            raise ValueError(f"rebalance threshold is an imbalance (max/mean >= 1), got {self.threshold}")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"rebalance min_gain must be in [0, 1), got {self.min_gain}")
        if self.extra_copies_per_layer < 0 or self.min_tokens < 0 or self.cooldown_s < 0:
            raise ValueError("rebalance extra_copies_per_layer, min_tokens and cooldown_s must be >= 0")


@dataclass(frozen=True)
class ExpertAutoscalingConfig:
    """Scales the expert-worker pool of one model group, independently of Serve's replica autoscaling.

    Busy fraction: the share of wall time the busiest expert worker spent running experts (the
    pool's mean times its imbalance: the worker every step waits for). Above `upscale_busy` for
    `upscale_delay_s` → one worker more (up to max_workers); below `downscale_busy` for
    `downscale_delay_s` → one fewer (down to min_workers). None for min/max: the group's
    starting number of expert workers.
    """

    enabled: bool = False
    min_workers: int | None = None
    max_workers: int | None = None
    upscale_busy: float = 0.6
    downscale_busy: float = 0.2
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    interval_s: float = 2.0

    def __post_init__(self) -> None:
        _finite(self)
        if self.min_workers is not None and self.min_workers < 1:
            raise ValueError(f"expert autoscaling min_workers must be >= 1, got {self.min_workers}")
        if (self.min_workers is not None and self.max_workers is not None
                and self.max_workers < self.min_workers):
            raise ValueError(f"expert autoscaling max_workers ({self.max_workers}) < min_workers "
                             f"({self.min_workers})")
        if not 0 <= self.downscale_busy < self.upscale_busy <= 1:
            raise ValueError("expert autoscaling needs 0 <= downscale_busy < upscale_busy <= 1, got "
                             f"{self.downscale_busy} and {self.upscale_busy}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0 or self.interval_s <= 0:
            raise ValueError("expert autoscaling delays must be >= 0 and interval_s > 0")

    def bounds(self, initial_workers: int) -> tuple[int, int]:
        """(min, max) expert workers, the unset ones taken from the group's starting size.

        An unset bound never crosses the set one: max_workers=3 on a group that starts with 4
        gives (3, 3), not the empty (4, 3).
        """
        if self.min_workers is not None:
            lo = self.min_workers
        else:
            lo = initial_workers if self.max_workers is None else min(initial_workers, self.max_workers)
        hi = self.max_workers if self.max_workers is not None else max(initial_workers, lo)
        return lo, hi


@dataclass(frozen=True)
class ElasticConfig:
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    autoscaling: ExpertAutoscalingConfig = field(default_factory=ExpertAutoscalingConfig)


def _finite(config) -> None:
    """NaN passes every `<` check; refuse it (and infinities) outright."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(config).__name__}.{f.name} must be finite, got {value}")
