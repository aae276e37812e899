"""Engine failures as refusal kinds: one table for HTTP and gRPC (DESIGN.md §5).

Whatever a call to the engine deployment raises (the replica's own refusals, Serve's and Ray's
errors, an error output of the engine) becomes a `Refusal` here, and each protocol renders its
kind (gateway/errors.py, gateway/grpc_status.py). A new error class is one row of FAILURES.

Ray re-raises an exception of the replica as a `RayTaskError` (a subclass of both it and the
original class); the table is matched against the original, its `cause`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from gateway.admission import EngineDraining, EngineOverloaded
from gateway.refusal import Kind, Refusal, internal_error

log = logging.getLogger(__name__)


class EngineFailed(Exception):
    """The engine ended the request with an error output (e.g. an unrecoverable step failure), or
    ended its stream before the request finished."""


@dataclass(frozen=True)
class Failure:
    """One row: exceptions of `classes` are refusals of `kind`; `message` may name the exception's
    own message ({cause}) or its class ({name})."""

    classes: tuple[type[BaseException], ...]
    kind: Kind
    message: str


# The first row that matches decides; an exception no row matches is INTERNAL (a bug).
FAILURES = (
    Failure((EngineFailed,), Kind.UNAVAILABLE, "The engine failed the request: {cause}"),
    Failure((EngineOverloaded,), Kind.OVERLOADED, "Too many requests: {cause}."),
    # Serve's own queue in front of the engine replicas is full: overload too, not a failure.
    Failure((BackPressureError,), Kind.OVERLOADED,
            "The server is overloaded: too many requests are queued; retry later."),
    Failure((EngineDraining,), Kind.UNAVAILABLE, "Unavailable: {cause}."),
    # DeadlineExceeded (the request's budget, gateway/deadline.py) and any other timeout.
    Failure((TimeoutError,), Kind.DEADLINE, "Request timed out: {cause}."),
    # Admission refused it, e.g. a prompt that can never fit in the KV cache.
    Failure((ValueError,), Kind.INVALID, "{cause}"),
    # No replica, or a replica or worker died.
    Failure((DeploymentUnavailableError, RayError), Kind.UNAVAILABLE, "The engine is not available: {name}."),
)


def classify(exc: BaseException) -> Refusal:
    """The refusal for an exception raised by a call to the engine deployment."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    for failure in FAILURES:
        if isinstance(cause, failure.classes):
            return Refusal(failure.kind, failure.message.format(cause=cause, name=type(cause).__name__))
    log.error("an engine call failed unexpectedly", exc_info=cause)
    return internal_error(cause)
