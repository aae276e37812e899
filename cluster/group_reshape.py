"""Changing a running model group's expert plane: its placement, or its number of expert workers
(issue 16). The executor (cluster/ray_executor.py) owns the workers; this module holds the steps.

Two shapes of change, both in two phases:

- **Switch** (a rebalance: the same workers). Every worker prepares the new placement (an expert
  worker loads the copies it lacks, on another actor thread, while steps go on); then the
  executor's placement version moves on, and the next step carries it: each worker switches
  before running that step. No step waits for a weight load; nothing pauses.
- **Resize** (scale up or down, or a repair that drops a dead worker). New workers start in
  free or newly reserved bundles and load their experts, survivors prepare, all while steps go
  on; then, between two steps (the executor's step lock held), the step loops end, the
  survivors leave their process group and everyone joins a new one on the new placement.
  That re-forming is the only pause; attention workers keep their KV caches throughout.

Every change is checked against the group it was prepared for: when a fault replaced workers
meanwhile, it is abandoned (`GroupChanged`) and the caller may try again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

import ray

from cluster.actor_state import actor_id
from cluster.group_restart import until_dead
from cluster.placement import Placement
from cluster.ray_await import awaited
from cluster.slot import Slot
from workers.group.placement_update import PlacementUpdate
from workers.group.spec import GroupSpec

log = logging.getLogger(__name__)

# After the channel closes, an idle worker's step loop returns at once; one still in a collective
# with a stalled peer returns once that peer's process is gone, and Ray takes about 5 s to
# force-kill a stopped process (measured here).
LOOPS_END_S = 15.0


class GroupChanged(Exception):
    """The group's workers changed (a fault) between preparing a change and making it."""


@dataclass(frozen=True)
class Resize:
    """A prepared resize: what `finish_resize` makes true between two steps."""

    placement: Placement
    version: int
    spec: GroupSpec
    before: tuple[str, ...]  # every worker's actor id when it was prepared
    kept: tuple[int, ...]  # expert worker indices that stay, in their (new) order
    dropped: tuple[int, ...]  # expert worker indices that leave
    new_workers: tuple  # actor handles of the workers started for it, after the kept ones
    new_slots: tuple[Slot, ...]


def worker_ids(group) -> tuple[str, ...]:
    return tuple(actor_id(w) for w in group.workers)


async def prepare_switch(group, placement: Placement) -> tuple[int, tuple[str, ...]]:
    """Every worker prepares `placement` (same ranks); its version and the group it was prepared for."""
    version = group.placement_version + 1
    before = worker_ids(group)
    expert_map = placement.to_expert_map(group.num_attention_workers)
    await asyncio.gather(*[awaited(w.prepare_placement.remote(PlacementUpdate(version, expert_map, rank)))
                           for rank, w in enumerate(group.workers)])
    return version, before


def finish_switch(group, placement: Placement, version: int, before: tuple[str, ...]) -> None:
    """With the step lock held: the next step runs on `placement`."""
    if worker_ids(group) != before or group.placement_version != version - 1:
        raise GroupChanged("the group changed while the new placement loaded")
    group.set_placement(placement, version, group.spec)


async def prepare_resize(group, placement: Placement, dropped: tuple[int, ...] = ()) -> Resize:
    """Start the new workers and have the survivors load the new placement; steps go on meanwhile.

    Expert workers at indices `dropped` leave (a dead one, or the ones a scale-down removes);
    the others keep their order and come first; workers started for the placement follow.
    """
    num_attention = group.num_attention_workers
    kept = tuple(i for i in range(group.num_expert_workers) if i not in dropped)
    num_new = placement.num_expert_workers - len(kept)
    if num_new < 0:
        raise ValueError(f"the placement has {placement.num_expert_workers} expert workers, "
                         f"{len(kept)} stay")
    version = group.placement_version + 1
    expert_map = placement.to_expert_map(num_attention)
    spec = dataclasses.replace(group.spec, expert_map=expert_map, placement_version=version)
    before = worker_ids(group)
    survivors = list(group.workers[:num_attention]) + [group.workers[num_attention + i] for i in kept]
    new_workers, new_slots = [], []
    try:
        for j in range(num_new):
            slot = await group.acquire_slot()
            new_slots.append(slot)
            new_workers.append(group.start_in(slot, num_attention + len(kept) + j, spec))
        await asyncio.gather(*[awaited(w.where.remote()) for w in new_workers])  # up, experts loaded
        await asyncio.gather(*[awaited(w.prepare_placement.remote(PlacementUpdate(version, expert_map, rank)))
                               for rank, w in enumerate(survivors)])
    except BaseException:
        _discard(group, new_workers, new_slots)
        raise
    return Resize(placement, version, spec, before, kept, tuple(dropped), tuple(new_workers),
                  tuple(new_slots))


async def finish_resize(group, resize: Resize) -> float:
    """With the step lock held: re-form the group on the prepared placement; the pause in seconds.

    Raises GroupChanged (nothing done) when a fault replaced workers since `prepare_resize`;
    any other error leaves the group without a process group: the caller restarts it.
    """
    if worker_ids(group) != resize.before:
        _discard(group, resize.new_workers, resize.new_slots)
        raise GroupChanged("the group changed while the resize was prepared")
    t0 = time.perf_counter()
    num_attention = group.num_attention_workers
    survivor_ranks = list(range(num_attention)) + [num_attention + i for i in resize.kept]
    leaving = [group.workers[num_attention + i] for i in resize.dropped]
    leaving_slots = [group.slots[num_attention + i] for i in resize.dropped]
    loops = group.take_loops()
    if loops is not None:
        loops.close()  # idle step loops return at once; a dropped live worker's too
        await asyncio.wait_for(asyncio.gather(*[awaited(loops.refs[r]) for r in survivor_ranks]), LOOPS_END_S)
    for w in leaving:
        ray.kill(w, no_restart=True)
    survivors = [group.workers[r] for r in survivor_ranks]
    await asyncio.gather(*[awaited(w.leave.remote()) for w in survivors])
    workers = survivors + list(resize.new_workers)
    slots = [group.slots[r] for r in survivor_ranks] + list(resize.new_slots)
    group.set_members(workers, slots)
    group.set_placement(resize.placement, resize.version, resize.spec)
    await group.form_group(placement_version=resize.version)
    pause = time.perf_counter() - t0
    _in_background(group, _release_when_dead(group, leaving, leaving_slots))
    log.info("model group re-formed with %d expert workers on placement %d in %.2fs",
             resize.placement.num_expert_workers, resize.version, pause)
    return pause


async def _release_when_dead(group, actors: list, slots: list[Slot]) -> None:
    """A bundle is free for a new worker only once Ray has let its old one go."""
    try:
        await asyncio.wait_for(until_dead(actors), 60.0)
    except TimeoutError:
        log.warning("a removed expert worker was not reported dead within 60s; its bundle stays held")
        return
    for slot in slots:
        group.release_slot(slot)


def _discard(group, workers, slots) -> None:
    for w in workers:
        ray.kill(w, no_restart=True)
    if workers or slots:
        _in_background(group, _release_when_dead(group, list(workers), list(slots)))


def _in_background(group, coro) -> None:
    """Tracked by the group: it cancels them at shutdown, tests can await them."""
    task = asyncio.ensure_future(coro)
    group.background.add(task)
    task.add_done_callback(group.background.discard)
