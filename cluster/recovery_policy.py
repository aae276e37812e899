"""Whether the engine may try to recover from one more worker fault: a pure decision.

A fault that keeps coming back (a worker that crashes on every step, a node that flaps)
must not turn into an endless restart loop that holds requests hostage: at most
`max_recoveries` recoveries within any `window_s` seconds. Past that, the engine fails
every request with an explicit error and reports itself unhealthy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RecoveryPolicy:
    max_recoveries: int = 3  # within window_s; 0 never recovers
    window_s: float = 300.0
    timeout_s: float = 120.0  # one recovery (restart, placement, rendezvous) may take this long

    def __post_init__(self) -> None:
        if self.max_recoveries < 0:
            raise ValueError(f"max_recoveries must be >= 0, got {self.max_recoveries}")
        if self.window_s <= 0 or self.timeout_s <= 0:
            raise ValueError("window_s and timeout_s must be > 0")

    def may_recover(self, past_recoveries: Sequence[float], now: float) -> bool:
        """True if fewer than max_recoveries of `past_recoveries` (monotonic times) fall in the window."""
        recent = sum(1 for t in past_recoveries if now - t < self.window_s)
        return recent < self.max_recoveries
