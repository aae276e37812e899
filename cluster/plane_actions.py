"""The expert plane's three actions on a running group, each reported as a PlaneEvent:
switch to a new placement (a rebalance), scale the expert pool to a size, and grow back to the
group's target size after a repair dropped a worker (cluster/worker_repair.py).

Each runs its slow part (weight loads, worker start-up) while steps go on and takes the step
lock only for the switch or the re-forming (cluster/group_reshape.py). One action at a time per
group (`group.reshaping`); a fault that changes the workers meanwhile abandons it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from cluster.fault_diagnosis import one_line
from cluster.group_reshape import GroupChanged, finish_resize, finish_switch, prepare_resize, prepare_switch
from cluster.placement import LayerExpert, Placement
from cluster.plane_event import PlaneEvent
from cluster.rebalance_policy import cheapest_to_drop, place_for_workers

log = logging.getLogger(__name__)

GROW_BACK_RETRY_S = 1.0  # between attempts to grow back (a dead worker's bundle frees in a moment)
GROW_BACK_ATTEMPTS = 30
FREE_SLOT_WAIT_S = 15.0


async def rebalance_to(group, placement: Placement, *, imbalance_before: float | None = None,
                       imbalance_after: float | None = None) -> PlaneEvent:
    """Every worker loads its new copies in the background; the next step after that runs on
    `placement`. Steps never wait for it."""
    t0 = time.perf_counter()

    def event(outcome: str, detail: str = "") -> PlaneEvent:
        return PlaneEvent("rebalance", outcome, group.placement_version, group.num_expert_workers,
                          time.perf_counter() - t0, 0.0, imbalance_before, imbalance_after, detail)

    if group.reshaping:
        return _emit(group, event("abandoned", "another change of the expert plane is under way"))
    group.reshaping = True
    try:
        version, before = await prepare_switch(group, placement)
        async with group.step_lock():
            finish_switch(group, placement, version, before)
    except GroupChanged as exc:
        return _emit(group, event("abandoned", str(exc)))
    except Exception as exc:  # a worker that could not load its copies: the old placement stays
        log.warning("rebalance failed: %s", one_line(exc))
        return _emit(group, event("failed", one_line(exc)))
    finally:
        group.reshaping = False
    return _emit(group, event("done"))


async def scale_to(group, num_workers: int, *, load: Mapping[LayerExpert, float] | None = None,
                   timeout_s: float = 300.0, reason: str = "") -> PlaneEvent | None:
    """Grow or shrink the expert pool to `num_workers`; None when it has that size already.

    New workers start (in free or new bundles) and everyone loads the new placement while steps
    go on; the process group re-forms between two steps. A scale-down removes the workers whose
    experts the others can take over with the fewest loads.
    """
    current = group.num_expert_workers
    if num_workers == current:
        return None
    if num_workers < 1:
        raise ValueError(f"an expert pool needs at least one worker, got {num_workers}")
    kind = "scale_up" if num_workers > current else "scale_down"
    t0, pause = time.perf_counter(), 0.0

    def event(outcome: str, detail: str = reason) -> PlaneEvent:
        return PlaneEvent(kind, outcome, group.placement_version, group.num_expert_workers,
                          time.perf_counter() - t0, pause, detail=detail)

    if group.reshaping:
        return _emit(group, event("abandoned", "another change of the expert plane is under way"))
    group.reshaping = True
    try:
        if num_workers > current:
            placement, dropped = place_for_workers(group.placement, num_workers, load), ()
        else:  # the workers whose going leaves the survivors the fewest copies to load
            placement, dropped = cheapest_to_drop(group.placement, num_workers, load)
        try:
            resize = await asyncio.wait_for(prepare_resize(group, placement, dropped), timeout_s)
        except GroupChanged as exc:
            return _emit(group, event("abandoned", str(exc)))
        except Exception as exc:  # no room for a worker, a load that failed: nothing changed
            log.warning("%s to %d expert workers failed: %s", kind.replace("_", " "), num_workers,
                        one_line(exc))
            return _emit(group, event("failed", one_line(exc)))
        async with group.step_lock():
            t_pause = time.perf_counter()
            try:
                await asyncio.wait_for(finish_resize(group, resize), timeout_s)
            except GroupChanged as exc:
                return _emit(group, event("abandoned", str(exc)))
            except Exception as exc:  # half re-formed: only a restart mends the group
                log.warning("re-forming the group for a %s failed (%s); restarting it", kind, one_line(exc))
                await group.restart_all(timeout_s)
                pause = time.perf_counter() - t_pause
                return _emit(group, event("failed", one_line(exc)))
            pause = time.perf_counter() - t_pause
    finally:
        group.reshaping = False
    return _emit(group, event("done"))


def grow_back(group) -> asyncio.Task:
    """After a repair dropped a worker: scale back to the group's target size, in the background."""
    task = asyncio.ensure_future(_grow_back(group))
    group.background.add(task)
    task.add_done_callback(group.background.discard)
    return task


async def _grow_back(group) -> None:
    # The lost worker's bundle is free again once Ray has let it go (seconds): waiting for it beats
    # reserving a new bundle the cluster may not have.
    deadline = time.monotonic() + FREE_SLOT_WAIT_S
    while not group.free_slots and time.monotonic() < deadline and not group.closed:
        await asyncio.sleep(0.1)
    for _ in range(GROW_BACK_ATTEMPTS):
        if group.num_expert_workers >= group.target_expert_workers or group.closed:
            return
        event = await scale_to(group, group.target_expert_workers, load=group.recent_load,
                               reason="a repair dropped a worker: back to the target size")
        if event is not None and event.outcome == "done":
            return
        await asyncio.sleep(GROW_BACK_RETRY_S)
    log.warning("could not grow the expert pool back to %d workers after %d attempts",
                group.target_expert_workers, GROW_BACK_ATTEMPTS)


def _emit(group, event: PlaneEvent) -> PlaneEvent:
    log.info("expert plane: %s %s (placement %d, %d expert workers, %.2fs, paused %.3fs)%s", event.kind,
             event.outcome, event.placement_version, event.num_expert_workers, event.seconds,
             event.pause_seconds, f": {event.detail}" if event.detail else "")
    group.emit(event)
    return event
