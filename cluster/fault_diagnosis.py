"""Which worker made a step fail (DESIGN.md §5): a dead actor first, else the one that does not answer.

The step's own calls tell part of it: an actor that died raises `RayActorError`. A collective
error is usually only the symptom of a peer that vanished, and a stalled step names nobody, so
every worker is then asked a cheap `where()`: a live worker answers within milliseconds even
mid-collective (workers run three threads), so a dead one or one that does not answer is the
culprit. `blame` makes the decision from those answers and is pure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ray.exceptions import RayActorError

from cluster.ray_await import awaited
from cluster.worker_fault import WorkerFault

PROBE_TIMEOUT_S = 2.0  # a live actor answers `where()` in milliseconds, even mid-collective


@dataclass(frozen=True)
class Roster:
    """Who each rank of the model group is, to name it in a fault."""

    kinds: tuple[str, ...]  # "attention" | "expert", by rank
    actor_ids: tuple[str, ...]
    node_ids: Mapping[int, str | None]

    def fault(self, cause: str, rank: int, detail: str) -> WorkerFault:
        return WorkerFault(cause, rank, self.kinds[rank], detail, actor_id=self.actor_ids[rank],
                           node_id=self.node_ids.get(rank))


async def diagnose(calls: Sequence[asyncio.Future], workers: Sequence, roster: Roster, *, stalled: bool,
                   step_timeout_s: float) -> WorkerFault:
    """`calls`: the step's call to each rank (done, failed, or cancelled); `stalled`: none failed,
    the step ran past `step_timeout_s`."""
    errors = {rank: c.exception() for rank, c in enumerate(calls)
              if c.done() and not c.cancelled() and c.exception() is not None}
    if any(isinstance(exc, RayActorError) for exc in errors.values()):
        probes: list[object] = []  # a dead actor is the answer; nobody needs asking
    else:
        probes = await asyncio.gather(*[asyncio.wait_for(awaited(w.where.remote()), PROBE_TIMEOUT_S)
                                        for w in workers], return_exceptions=True)
    return blame(errors, probes, roster, stalled=stalled, step_timeout_s=step_timeout_s)


def blame(errors: Mapping[int, BaseException], probes: Sequence[object], roster: Roster, *, stalled: bool,
          step_timeout_s: float) -> WorkerFault:
    """The fault, from the step calls' errors by rank and each rank's probe answer (or error)."""
    dead = [rank for rank, exc in errors.items() if isinstance(exc, RayActorError)]
    if dead:
        return roster.fault("died", dead[0], one_line(errors[dead[0]]))
    for rank, probe in enumerate(probes):
        if isinstance(probe, RayActorError):
            return roster.fault("died", rank, one_line(probe))
    for rank, probe in enumerate(probes):
        if isinstance(probe, BaseException):
            cause = "stalled" if stalled else "collective_error"
            return roster.fault(cause, rank, f"does not answer a probe within {PROBE_TIMEOUT_S:.0f}s "
                                             f"({type(probe).__name__})")
    if stalled:
        return WorkerFault("stalled", None, "unknown", f"the step did not finish within {step_timeout_s:g}s")
    rank, exc = next(iter(errors.items()))
    return roster.fault("collective_error", rank, one_line(exc))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception in one line: Ray's wrap the remote traceback, which logs already carry."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"
