"""The messages of the step channel (engine ⇄ worker step loops), frozen, pickled on the wire.

`StepRoute` tells a worker, once at set-up (a Ray call), how to reach the engine's step
broadcast; `StepMessage` is one step as every worker sees it; `StepFailure` is what a worker's
loop sends back instead of a result when its step raised (a collective error, say).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.model.batch_spec import ScheduledBatch

VIAS = ("ring", "tcp")


@dataclass(frozen=True)
class StepRoute:
    """How one worker reaches the engine's step broadcast (cluster/step_broadcast.py).

    ring: the worker shares the engine's node: messages in the shared-memory ring `ring_name`,
          frames on the Unix socket `address` (a str, Linux's abstract namespace)
    tcp:  another node: whole messages in frames on the TCP socket `address` (host, port)
    """

    rank: int
    token: bytes  # proves to the engine that the connection is this group's worker
    via: str  # one of VIAS
    address: str | tuple[str, int]
    ring_name: str | None = None

    def __post_init__(self) -> None:
        if self.via not in VIAS:
            raise ValueError(f"via must be one of {VIAS}, got {self.via!r}")
        if (self.via == "ring") != (self.ring_name is not None):
            raise ValueError("a ring route names its ring; a tcp route has none")


@dataclass(frozen=True)
class StepMessage:
    """One step for the whole group: attention rank r runs batches[r]; every worker follows the
    step's dispatch mode (None: exact; a number: low-latency buffers of that many tokens) and
    its expert placement (a worker still on an older one switches first: placement_update.py)."""

    low_latency_tokens: int | None
    batches: tuple[ScheduledBatch, ...]  # by attention rank; () in the copy sent to expert workers only
    placement_version: int = 0


@dataclass(frozen=True)
class StepFailure:
    """A step that raised in a worker's loop (the loop carries on; the engine decides)."""

    rank: int
    error: str  # "Type: message", one line
    traceback: str
