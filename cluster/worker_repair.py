"""Repairing one worker of a model group, not the group (DESIGN.md §5; issue 16).

When an expert worker died, its peers' step loops report the failed step and wait for the
next one: they are idle, and they keep what they hold (the attention workers their KV caches,
every survivor its weights). So only the dead actor is replaced, in its own bundle; the
survivors leave their process group, and everyone joins a new one (the same backend choice,
from every rank's device), then the step loops start again. No sequence is prefilled again:
the engine re-runs the step that failed.

A stalled worker (its peers may sit in a collective until the backend's timeout) and a dead
attention worker (its KV cache is gone) still restart the whole group (cluster/group_restart.py),
and so does any repair that fails or runs out of time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Protocol

import ray
from ray.exceptions import RayError

from cluster.fault_diagnosis import one_line
from cluster.group_restart import RESTART_RETRY_S, BundlesMoved, layout, until_dead, while_bundles_stay
from cluster.ray_await import awaited
from cluster.reservation import Reservation
from cluster.step_loops import StepLoops
from cluster.worker_fault import WorkerFault

log = logging.getLogger(__name__)

# After the channel closes, an idle survivor's step loop returns at once; one that does not
# within this is still inside a collective with the dead peer, and the group restarts instead.
LOOPS_END_S = 5.0


def repairable(fault: WorkerFault, *, has_step_loops: bool) -> bool:
    """Whether replacing only the failed worker is worth trying: an expert worker that died,
    with step loops whose end tells that every survivor is idle."""
    return fault.cause == "died" and fault.kind == "expert" and fault.rank is not None and has_step_loops


class RepairableGroup(Protocol):
    """What a one-worker repair needs of the executor that owns the workers (cluster/ray_executor.py)."""

    workers: list
    reservation: Reservation

    def take_loops(self) -> StepLoops | None: ...

    async def start_worker(self, rank: int) -> None:
        """Start a new worker for `rank` in its bundle; returns once it answers (weights loaded)."""
        ...

    def kill_worker(self, rank: int) -> None: ...

    async def rejoin(self, rank: int) -> list[dict]:
        """The survivors of `rank` leave their process group; all rendezvous, join and start their
        step loops; every worker's `where()` answer."""
        ...


async def repair_worker(group: RepairableGroup, rank: int, timeout_s: float) -> list[dict]:
    """Replace the dead worker of `rank` and re-form the group around it; every `where()` answer.

    Raises (TimeoutError past `timeout_s`, BundlesMoved, a Ray error, ...) when the repair cannot
    be done; the caller then restarts the whole group.
    """
    deadline = time.monotonic() + timeout_s

    async def within_deadline(awaitable, bound_s: float = float("inf")):
        return await asyncio.wait_for(awaitable, max(min(deadline - time.monotonic(), bound_s), 0.001))

    t0 = time.perf_counter()
    dead = group.workers[rank]
    loops = group.take_loops()
    if loops is None:
        raise RuntimeError("a one-worker repair needs the step loops")
    ray.kill(dead, no_restart=True)
    loops.close()  # every survivor's loop returns once its channel closes: the survivor is idle
    survivors = [r for r in range(len(group.workers)) if r != rank]
    try:
        await within_deadline(asyncio.gather(*[awaited(loops.refs[r]) for r in survivors]), LOOPS_END_S)
    except TimeoutError:
        raise TimeoutError(f"a survivor's step loop did not end within {LOOPS_END_S:g}s "
                           f"(still in a collective with the dead peer?)") from None
    loops_ended_s = time.perf_counter() - t0
    await within_deadline(until_dead([dead]))  # its bundle is reused: Ray must have let it go
    # The survivors stay as they are (idle, in their old process group) until the new worker is
    # up: a node that died a moment ago still holds the bundle until Ray moves it, and a worker
    # started there dies or hangs, so that start is tried again, and only then does anyone rejoin.
    for attempt in itertools.count(1):
        try:
            await while_bundles_stay(group.reservation.placement_group, within_deadline,
                                    lambda: group.start_worker(rank))
            break
        except (RayError, BundlesMoved) as exc:
            log.warning("starting a new rank %d, attempt %d, failed: %s", rank, attempt, one_line(exc))
            group.kill_worker(rank)
            if layout(group.reservation.placement_group)[0] == "REMOVED":
                raise RuntimeError("the model group's placement group was removed") from exc
            await within_deadline(asyncio.sleep(RESTART_RETRY_S))
    started_s = time.perf_counter() - t0
    where = await while_bundles_stay(group.reservation.placement_group, within_deadline,
                                     lambda: group.rejoin(rank))
    log.info("rank %d repaired in %.2fs (survivors idle after %.2fs, the new worker up after %.2fs); "
             "%d survivors kept their state", rank, time.perf_counter() - t0, loops_ended_s, started_s,
             len(survivors))
    return where
