"""What the expert plane reports when its shape changes: for logs, metrics and tests."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("rebalance", "scale_up", "scale_down", "repair")
OUTCOMES = ("done", "abandoned", "failed")  # abandoned: the group changed under it (a fault); tried later


@dataclass(frozen=True)
class PlaneEvent:
    kind: str  # one of KINDS
    outcome: str  # one of OUTCOMES
    placement_version: int  # the placement in force afterwards
    num_expert_workers: int  # afterwards
    seconds: float  # the whole change, background loads included
    pause_seconds: float  # how long steps waited for it (re-forming the process group; 0 for a rebalance)
    imbalance_before: float | None = None  # max/mean tokens per expert worker over the window
    imbalance_after: float | None = None  # the same window's load under the new placement (predicted)
    detail: str = ""  # one line: why, or what went wrong

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
