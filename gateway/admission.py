"""Early rejection at an engine replica's door (DESIGN.md §5: overload is shed early).

An engine replica runs at most `max_num_seqs` sequences per attention worker; the rest wait in
its scheduler's queue. That queue is bounded: a request that would join a full one is refused
at once with `EngineOverloaded` (HTTP 429 + `Retry-After`, gRPC `RESOURCE_EXHAUSTED`) instead
of waiting behind work that cannot start for a long time. A draining replica (shutting down)
refuses every new request with `EngineDraining` (HTTP 503 + `Retry-After`, gRPC `UNAVAILABLE`).

The errors are raised inside the replica and cross the Serve handle as themselves (Ray wraps
them in a `RayTaskError` subclass of the original class), so the ingress maps them by type.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_QUEUED_REQUESTS = 256


class EngineOverloaded(Exception):
    """The replica's waiting queue is full: retry later (429 / RESOURCE_EXHAUSTED)."""


class EngineDraining(Exception):
    """The replica is shutting down and admits nothing new (503 / UNAVAILABLE)."""


@dataclass(frozen=True)
class AdmissionState:
    """What the admission decision looks at, read from the replica just before it."""

    num_unscheduled: int  # waiting in the scheduler + inside the admission batch right now
    draining: bool


def refusal(state: AdmissionState, max_queued_requests: int) -> Exception | None:
    """The error to refuse a new request with, or None to admit it."""
    if state.draining:
        return EngineDraining("the server is shutting down and takes no new requests; retry on another")
    if state.num_unscheduled >= max_queued_requests:
        return EngineOverloaded(f"the server is overloaded ({state.num_unscheduled} requests are already "
                                "waiting); retry later")
    return None
