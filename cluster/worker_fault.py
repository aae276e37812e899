"""What went wrong with a worker of a model group, as the engine sees it (DESIGN.md §5).

The worker group turns every way a step can fail (an actor that died, a collective that
raised, a step that did not finish within the watchdog's timeout) into one `WorkerFault`,
raised to the engine inside `WorkerFailed`. The fault names the worker so logs and
metrics can say which one failed; `rank` is None when no single worker could be blamed
(every worker still answers, yet the step failed).
"""

from __future__ import annotations

from dataclasses import dataclass

CAUSES = ("died", "collective_error", "stalled")


@dataclass(frozen=True)
class WorkerFault:
    cause: str  # one of CAUSES
    rank: int | None  # the failed worker; None: not identified
    kind: str  # "attention" | "expert" | "unknown"
    detail: str  # the error, or what the watchdog saw
    actor_id: str | None = None
    node_id: str | None = None

    def __post_init__(self) -> None:
        if self.cause not in CAUSES:
            raise ValueError(f"cause must be one of {CAUSES}, got {self.cause!r}")

    def describe(self) -> str:
        """One line for logs and error messages: which worker, where, and why."""
        who = "an unidentified worker" if self.rank is None else f"{self.kind} worker rank {self.rank}"
        where = "".join(f" {k}={v}" for k, v in (("actor", self.actor_id), ("node", self.node_id)) if v)
        return f"{who}{where} {self.cause.replace('_', ' ')}: {self.detail}"


class WorkerFailed(Exception):
    """A step failed because of a worker; carries the fault (an exception cannot be frozen)."""

    def __init__(self, fault: WorkerFault) -> None:
        super().__init__(fault.describe())
        self.fault = fault
