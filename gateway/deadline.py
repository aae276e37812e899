"""Per-request deadlines (DESIGN.md §5: deadlines give 408 / DEADLINE_EXCEEDED).

A request's time budget is the server's `request_timeout_s` or, shorter, what the client asks
for: the `X-Request-Timeout` header (seconds) over HTTP, the call's own deadline over gRPC. The
ingress puts it in `GenerationRequest.timeout_s`; the engine replica counts it from the
request's arrival at the ingress and, when it runs out, aborts the sequence (its KV blocks are
freed at once) and raises `DeadlineExceeded`, which crosses the Serve handle as itself.
"""

from __future__ import annotations

import math

REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before it finished (HTTP 408, gRPC DEADLINE_EXCEEDED)."""


def parse_timeout(text: str) -> float:
    """Seconds from a header value like "2.5"; ValueError for anything not a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{REQUEST_TIMEOUT_HEADER} must be a number of seconds, got {text[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{REQUEST_TIMEOUT_HEADER} must be a positive number of seconds, got {text[:40]!r}")
    return value


def effective_timeout(server_s: float | None, client_s: float | None) -> float | None:
    """The shorter of the two budgets that are set; None when neither is (no deadline).

    A client may shorten its budget, never extend it past the server's: the server's limit is
    what protects the queue from work nobody waits for any more.
    """
    budgets = [t for t in (server_s, client_s) if t is not None]
    return min(budgets) if budgets else None


def remaining_s(timeout_s: float | None, arrival_time: float, now: float) -> float | None:
    """Seconds left of a budget counted from `arrival_time` (time.time()), never negative."""
    if timeout_s is None:
        return None
    return max(timeout_s - (now - arrival_time), 0.0)
