"""Autoscaling of the engine deployment: Serve adds and removes whole model groups.

One engine replica is one model group (the replica plus its attention and expert workers,
reserved together by its placement group), so Serve's replica autoscaler scales model groups.
The field names are those of Ray Serve's `AutoscalingConfig`, so a Serve config YAML and
`moe-serve serve` flags say the same thing.

Serve counts a streaming request as ongoing until its stream ends, so `target_ongoing_requests`
is "concurrent generations per model group". Scale-down drains: Serve stops routing to the
replica it picks, waits up to `graceful_shutdown_timeout_s` (a `ServeOptions` field) for its
streams to finish, then runs the replica's destructor (which shuts its workers down) and frees
its placement group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, kw_only=True)
class AutoscalingOptions:
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None  # None: min_replicas
    target_ongoing_requests: float = 2.0  # concurrent streams per replica Serve aims for
    upscale_delay_s: float = 30.0  # demand must stay high this long before a group is added
    downscale_delay_s: float = 600.0  # ... and low this long before one is drained and removed
    metrics_interval_s: float = 10.0  # how often handles and replicas report their request counts
    look_back_period_s: float = 30.0  # the window those counts are averaged over

    def __post_init__(self) -> None:
        # Scale-to-zero is refused: a model group's cold start (weights, process group) is tens
        # of seconds, and the ingress asks an engine replica for model info and readiness.
        if self.min_replicas < 1:
            raise ValueError(f"min_replicas must be >= 1, got {self.min_replicas}")
        low, high = self.min_replicas, self.max_replicas
        if high < low:
            raise ValueError(f"max_replicas ({high}) must be >= min_replicas ({low})")
        if self.initial_replicas is not None and not low <= self.initial_replicas <= high:
            raise ValueError(f"initial_replicas must lie in [{low}, {high}], got {self.initial_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("metrics_interval_s", "look_back_period_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def serve_config(self) -> dict:
        """The `autoscaling_config` of a Serve deployment (keys of ray.serve.config.AutoscalingConfig)."""
        return {k: v for k, v in asdict(self).items() if v is not None}
