"""How a model group notices a worker fault, and how often the engine may recover from one
(DESIGN.md §5)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.recovery_policy import RecoveryPolicy

DEFAULT_STEP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class FaultConfig:
    collective_timeout_s: float = 120.0  # gloo/nccl: a collective with a dead peer errors after this
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S  # the watchdog: a step taking longer is a stalled worker
    recovery: RecoveryPolicy = field(default_factory=RecoveryPolicy)

    def __post_init__(self) -> None:
        if self.step_timeout_s <= 0 or self.collective_timeout_s <= 0:
            raise ValueError("step_timeout_s and collective_timeout_s must be > 0")
