"""Restarting a model group's workers in their bundles after a worker fault (DESIGN.md §5).

Every member is replaced: live members may be blocked in a collective with a stalled peer
(gloo only gives up after its own timeout), and a dead attention worker took its KV cache
with it. An expert worker that died is repaired alone first (cluster/worker_repair.py); this
restart is what follows when that repair cannot be done.
Ray reschedules the bundles of a node that is gone onto other nodes when resources allow; the
restart waits for that, and starts again when a bundle moves under it, bounded by the
caller's timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup, placement_group_table

from cluster.actor_state import actor_state
from cluster.fault_diagnosis import one_line
from cluster.ray_await import awaited
from cluster.reservation import Reservation

log = logging.getLogger(__name__)

RESTART_RETRY_S = 0.5  # pause between attempts to restart a group whose new worker died at once


class RestartableGroup(Protocol):
    """What a restart needs of the executor that owns the workers (cluster/ray_executor.py)."""

    workers: list
    reservation: Reservation

    def kill_all(self) -> None: ...

    async def start_and_join(self) -> list[dict]:
        """Start every worker into its bundle, rendezvous, join; their `where()` answers."""
        ...


class BundlesMoved(Exception):
    """Ray rescheduled a bundle of the placement group while workers were starting in it."""


async def restart_group(group: RestartableGroup, timeout_s: float) -> list[dict]:
    """Kill every worker, start them all again in their bundles; the new workers' `where()` answers.

    Raises TimeoutError when the group is not back within `timeout_s` (no resources for a
    bundle whose node is gone, say); the half-started workers are killed then.
    """
    deadline = time.monotonic() + timeout_s

    async def within_deadline(awaitable):
        return await asyncio.wait_for(awaitable, max(deadline - time.monotonic(), 0.001))

    old = group.workers
    group.kill_all()
    try:
        # Their bundles are reused: the new workers fit only once Ray has let the old go.
        await within_deadline(until_dead(old))
        log.info("old workers gone after %.2fs; restarting", timeout_s - (deadline - time.monotonic()))
        return await _restart_until_up(group, within_deadline)
    except TimeoutError:
        group.kill_all()
        raise TimeoutError(f"the model group was not back within {timeout_s:g}s "
                           f"(not enough resources for its placement group?)") from None


async def _restart_until_up(group: RestartableGroup, within_deadline) -> list[dict]:
    for attempt in itertools.count(1):
        try:
            return await _restart(group, within_deadline)
        except (RayError, BundlesMoved) as exc:
            # A node that died a moment ago still holds its bundles until Ray declares it dead
            # (health checks: seconds) and reschedules them; a worker started there meanwhile
            # dies or hangs. Try again until the deadline, unless the placement group itself
            # is gone (its owner is shutting down).
            log.warning("restart attempt %d of the model group failed: %s", attempt, one_line(exc))
            group.kill_all()
            if placement_group_table(group.reservation.placement_group).get("state") == "REMOVED":
                raise RuntimeError("the model group's placement group was removed") from exc
            await within_deadline(asyncio.sleep(RESTART_RETRY_S))
    raise AssertionError("unreachable")


async def _restart(group: RestartableGroup, within_deadline) -> list[dict]:
    """One attempt: the workers' `where()` answers once they joined.

    Raises BundlesMoved when Ray moves a bundle meanwhile: the node it was on died, and a
    worker started there would wait on it forever.
    """
    return await while_bundles_stay(group.reservation.placement_group, within_deadline, group.start_and_join)


async def while_bundles_stay(pg: PlacementGroup, within_deadline, work: Callable[[], Awaitable]):
    """What `work()` returns; BundlesMoved when Ray moves a bundle of `pg` meanwhile."""
    await within_deadline(awaited(pg.ready()))
    watcher = asyncio.ensure_future(until_moved(pg, layout(pg)))
    task = asyncio.ensure_future(work())
    try:
        await within_deadline(asyncio.wait({watcher, task}, return_when=asyncio.FIRST_COMPLETED))
    finally:
        for t in (watcher, task):
            t.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise BundlesMoved("a bundle of the model group moved to another node while its workers started")


def layout(pg: PlacementGroup) -> tuple[str, dict]:
    """The placement group's state and which node holds each bundle."""
    table = placement_group_table(pg)
    return table.get("state", ""), dict(table.get("bundles_to_node_id", {}))


async def until_moved(pg: PlacementGroup, before: tuple[str, dict], poll_s: float = 0.5) -> None:
    """Returns once the placement group's state or bundle placement differs from `before`."""
    while layout(pg) == before:
        await asyncio.sleep(poll_s)


async def until_dead(actors: list, poll_s: float = 0.2) -> None:
    """Returns once Ray reports every actor DEAD (their bundles are free again)."""
    while not all(actor_state(a) == "DEAD" for a in actors):
        await asyncio.sleep(poll_s)
