"""Repairing one worker of a model group, not the group (DESIGN.md §5; issue 16).

When a worker died (or stalled, and is killed), its peers' step loops report the failed step
and wait for the next one: they are idle, and they keep what they hold (the attention workers
their KV caches, every survivor its weights). So only the lost worker is dealt with:

- An expert worker, with at least one other: the survivors take over its experts (loaded from
  the checkpoint, cluster/placement_shrink.py) and the group re-forms without it, which needs
  no new process; a new worker then joins in the background as a scale-up would
  (cluster/plane_actions.py), so the pool is back to its size without a second pause in steps.
- Otherwise (an attention worker; a group's only expert worker; or survivors that cannot take
  the experts): a new actor is started in the lost one's bundle and the group re-forms around
  it. A new attention worker has an empty KV cache: its own sequences, and only they, prefill
  again.

Either way no other sequence is prefilled again: the engine re-runs the step that failed. A
repair that fails or runs out of time falls back to restarting the whole group
(cluster/group_restart.py).
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
from cluster.group_reshape import finish_resize, prepare_resize
from cluster.group_restart import RESTART_RETRY_S, BundlesMoved, layout, until_dead, while_bundles_stay
from cluster.placement_shrink import without_worker
from cluster.plane_actions import grow_back
from cluster.plane_event import PlaneEvent
from cluster.ray_await import awaited
from cluster.recovery_event import Repair
from cluster.reservation import Reservation
from cluster.step_loops import StepLoops
from cluster.worker_fault import WorkerFault

log = logging.getLogger(__name__)

# After the channel closes, an idle survivor's step loop returns at once; one that does not
# within this is still inside a collective with the dead peer, and the group restarts instead.
LOOPS_END_S = 5.0


def repairable(fault: WorkerFault, *, has_step_loops: bool) -> bool:
    """Whether repairing only the failed worker is worth trying: a worker that died or stalled,
    named, with step loops whose end tells that every survivor is idle."""
    return fault.cause in ("died", "stalled") and fault.rank is not None and has_step_loops


async def repair_one(group, fault: WorkerFault, timeout_s: float) -> Repair | None:
    """Repair the worker `fault` names, with the step lock held; None when the whole group must
    restart instead (the fault names no one, or every way of repairing it failed)."""
    if not repairable(fault, has_step_loops=group.loops is not None):
        return None
    rank, kind = fault.rank, group.kind_of(fault.rank)
    t0 = time.perf_counter()
    if kind == "expert" and group.num_expert_workers >= 2:
        try:
            return await _shrink_around(group, rank, timeout_s)
        except _GroupBroken as exc:
            log.warning("repairing expert worker rank %d by shrinking failed after %.2fs (%s); restarting "
                        "the whole group", rank, time.perf_counter() - t0, one_line(exc.__cause__))
            return None
        except Exception as exc:  # the group is as it was: replace the worker in its bundle instead
            log.warning("the survivors could not take expert worker rank %d's experts (%s); starting a new "
                        "worker in its bundle", rank, one_line(exc))
    try:
        await repair_worker(group, rank, max(timeout_s - (time.perf_counter() - t0), 0.001))
    except Exception as exc:  # anything: the group restart starts from scratch
        log.warning("repairing %s worker rank %d alone failed after %.2fs (%s); restarting the whole group",
                    kind, rank, time.perf_counter() - t0, one_line(exc))
        return None
    lost = (rank,) if kind == "attention" else ()
    return Repair(f"{kind}_worker", (kind,), lost)


class _GroupBroken(Exception):
    """A shrink failed after the group had begun re-forming: only a restart mends it."""


async def _shrink_around(group, rank: int, timeout_s: float) -> Repair:
    """The survivors take over expert worker `rank`'s experts; the group re-forms without it."""
    t0 = time.perf_counter()
    lost = group.workers[rank]
    group.kill_worker(rank)
    # A stalled worker goes only once Ray force-kills it (seconds); its peers' collectives with it
    # fail then, and their step loops come back to wait for the next step.
    await asyncio.wait_for(until_dead([lost]), timeout_s)
    index = rank - group.num_attention_workers
    placement = without_worker(group.placement, index)
    resize = await asyncio.wait_for(prepare_resize(group, placement, dropped=(index,)), timeout_s)
    try:
        pause = await asyncio.wait_for(finish_resize(group, resize),
                                       max(timeout_s - (time.perf_counter() - t0), 0.001))
    except Exception as exc:
        raise _GroupBroken() from exc
    seconds = time.perf_counter() - t0
    log.info("expert worker rank %d repaired in %.2fs: its experts went to the %d survivors (re-forming "
             "took %.2fs); a new worker joins in the background", rank, seconds, group.num_expert_workers,
             pause)
    group.emit(PlaneEvent("repair", "done", group.placement_version, group.num_expert_workers, seconds,
                          seconds, detail=f"expert worker rank {rank} lost; the survivors took its experts"))
    grow_back(group)
    return Repair("expert_worker", (), ())


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
