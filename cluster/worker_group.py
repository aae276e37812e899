"""A model group on Ray: A attention workers + X expert workers, one bundle each.

The engine drives the group with one Ray call per worker per step (`execute`); all
per-layer traffic stays inside the workers' all-to-all collectives.

Faults (DESIGN.md §5). `execute` is also the step watchdog: a worker that died, a
collective that raised, or a step that did not finish within `step_timeout_s` (a peer
stopped mid-collective) becomes a `WorkerFailed` naming the worker. `recover` then
replaces the whole group: live members may be blocked in a collective with the dead peer
(gloo only gives up after its own timeout), so killing and restarting every member into
the same bundles is both simpler and faster than unpicking them. Ray reschedules the
bundles of a node that is gone onto other nodes when resources allow; the restart waits
for that, bounded by the caller's timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.resource_check import describe_missing
from cluster.topology import TopologyConfig, worker_bundles
from cluster.worker_fault import WorkerFailed, WorkerFault
from workers.attention_worker import AttentionWorker
from workers.batch_spec import ScheduledBatch
from workers.collective_backend import RankDevice, choose_backend, describe_choice
from workers.device_memory import MemoryReport
from workers.expert_worker import ExpertWorker
from workers.group_spec import GroupSpec
from workers.step_output import StepOutput

log = logging.getLogger(__name__)

DEFAULT_STEP_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 2.0  # a live actor answers `where()` in milliseconds, even mid-collective
FAILURE_GRACE_S = 2.0  # after the first error, how long the others get to report theirs
RESTART_RETRY_S = 0.5  # pause between attempts to restart a group whose new worker died at once


@dataclass(frozen=True)
class GroupPlacement:
    """The placement group the workers go into, and the index of the first worker bundle.

    Inside a Serve replica, the replica's own bundle comes first (index 0) and the workers
    take the bundles after it; a standalone group owns its placement group from index 0.
    """

    placement_group: PlacementGroup
    first_bundle: int = 0
    owned: bool = False


def reserve(topology: TopologyConfig, timeout_s: float = 120.0) -> GroupPlacement:
    bundles = worker_bundles(topology)
    pg = placement_group(bundles, strategy=topology.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        missing = describe_missing(bundles, ray.available_resources())
        raise TimeoutError(f"could not reserve {bundles} ({topology.strategy}) within {timeout_s:.0f}s: "
                           f"{missing or 'the resources exist but not together as the strategy asks'}")
    return GroupPlacement(pg, 0, owned=True)


class RayWorkerGroup:
    """The Ray executor: same interface as LocalExecutor, plus `recover`."""

    def __init__(self, spec: GroupSpec, topology: TopologyConfig, placement: GroupPlacement | None = None,
                 ready_timeout_s: float = 300.0, step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S) -> None:
        if (topology.num_attention_workers, topology.world_size) != (spec.num_attention_workers,
                                                                     spec.world_size):
            raise ValueError("topology and group spec disagree on worker counts")
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        self.spec = spec
        self.topology = topology
        self.step_timeout_s = step_timeout_s
        self.placement = placement or reserve(topology)
        self.num_attention_workers = spec.num_attention_workers
        self._start_all()
        devices = ray.get([w.rank_device.remote() for w in self.workers], timeout=ready_timeout_s)
        self.backend = self._choose_backend(devices)
        addr, port = ray.get(self.workers[0].rendezvous_address.remote(), timeout=ready_timeout_s)
        self.rendezvous = (addr, port)
        ray.get([w.join.remote(addr, port, self.backend) for w in self.workers], timeout=ready_timeout_s)
        self._nodes = {info["rank"]: info.get("node_id") for info in self.where()}

    def _choose_backend(self, devices: list[RankDevice]) -> str:
        """The backend every rank will join with; logged once per group formed."""
        backend = choose_backend(devices)
        log.info("model group: %s", describe_choice(devices, backend))
        return backend

    def _start_all(self) -> None:
        bundles = worker_bundles(self.topology)
        self.workers = [self._start(rank, bundles[rank]) for rank in range(self.spec.world_size)]
        self.attention = self.workers[: self.spec.num_attention_workers]
        self.experts = self.workers[self.spec.num_attention_workers:]

    def _start(self, rank: int, bundle: dict[str, float]):
        cls = AttentionWorker if rank < self.spec.num_attention_workers else ExpertWorker
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement.placement_group,
            placement_group_bundle_index=self.placement.first_bundle + rank,
        )
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        actor = ray.remote(cls).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), resources=custom or None,
            scheduling_strategy=strategy, max_concurrency=2,  # 2: probes answer during a step
            name=None,
        )
        return actor.remote(self.spec, rank)

    def kind_of(self, rank: int) -> str:
        return self.topology.rank_kind(rank)

    # -- steps ------------------------------------------------------------------------------

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> tuple[StepOutput, ...]:
        refs = [w.execute.remote(b) for w, b in zip(self.attention, batches, strict=True)]
        refs += [w.execute.remote() for w in self.experts]
        calls = [asyncio.ensure_future(_awaited(ref)) for ref in refs]
        done, pending = await asyncio.wait(calls, timeout=self.step_timeout_s,
                                           return_when=asyncio.FIRST_EXCEPTION)
        if not pending:
            failed = [c for c in calls if c.exception() is not None]
            if not failed:
                return tuple(c.result() for c in calls[: self.num_attention_workers])
            stalled = False
        else:
            stalled = not any(c.exception() is not None for c in done)
            if not stalled:  # one failed: the dead peer's own error usually follows at once
                await asyncio.wait(pending, timeout=FAILURE_GRACE_S)
        for c in calls:
            if not c.done():
                c.cancel()  # the actors are replaced; nobody waits for these any more
        raise WorkerFailed(await self._diagnose(calls, stalled))

    async def _diagnose(self, calls: list[asyncio.Future], stalled: bool) -> WorkerFault:
        """Which worker failed: a dead actor first, else the one that does not answer a probe."""
        errors = {rank: c.exception() for rank, c in enumerate(calls)
                  if c.done() and not c.cancelled() and c.exception() is not None}
        dead = [rank for rank, exc in errors.items() if isinstance(exc, RayActorError)]
        if dead:
            return self._fault("died", dead[0], _short(errors[dead[0]]))
        probes = await asyncio.gather(*[asyncio.wait_for(_awaited(w.where.remote()), PROBE_TIMEOUT_S)
                                        for w in self.workers], return_exceptions=True)
        for rank, probe in enumerate(probes):
            if isinstance(probe, RayActorError):
                return self._fault("died", rank, _short(probe))
        for rank, probe in enumerate(probes):
            if isinstance(probe, BaseException):
                cause = "stalled" if stalled else "collective_error"
                return self._fault(cause, rank, f"does not answer a probe within {PROBE_TIMEOUT_S:.0f}s "
                                                f"({type(probe).__name__})")
        if stalled:
            return WorkerFault("stalled", None, "unknown",
                               f"the step did not finish within {self.step_timeout_s:g}s")
        rank, exc = next(iter(errors.items()))
        return self._fault("collective_error", rank, _short(exc))

    def _fault(self, cause: str, rank: int, detail: str) -> WorkerFault:
        return WorkerFault(cause, rank, self.kind_of(rank), detail,
                           actor_id=self.workers[rank]._actor_id.hex(), node_id=self._nodes.get(rank))

    # -- recovery ---------------------------------------------------------------------------

    async def recover(self, fault: WorkerFault, timeout_s: float) -> tuple[str, ...]:
        """Replace every worker and re-form the process group; returns the kinds restarted.

        Raises TimeoutError when the group is not back within `timeout_s` (no resources for
        a bundle whose node is gone, say); the half-started workers are killed then.
        """
        deadline = time.monotonic() + timeout_s

        async def within_deadline(awaitable):
            return await asyncio.wait_for(awaitable, max(deadline - time.monotonic(), 0.001))

        old = self.workers
        self._kill_all()
        try:
            # Their bundles are reused: the new workers fit only once Ray has let the old go.
            await within_deadline(_until_dead(old))
            log.info("old workers gone after %.2fs; restarting", timeout_s - (deadline - time.monotonic()))
            where = await self._restart_until_up(within_deadline)
        except TimeoutError:
            self._kill_all()
            raise TimeoutError(f"the model group was not back within {timeout_s:g}s "
                               f"(not enough resources for its placement group?)") from None
        self._nodes = {info["rank"]: info.get("node_id") for info in where}
        return tuple(self.kind_of(rank) for rank in range(self.spec.world_size))

    async def _restart_until_up(self, within_deadline) -> list[dict]:
        for attempt in itertools.count(1):
            try:
                return await self._restart(within_deadline)
            except (RayError, BundlesMoved) as exc:
                # A node that died a moment ago still holds its bundles until Ray declares it dead
                # (health checks: seconds) and reschedules them; a worker started there meanwhile
                # dies or hangs. Try again until the deadline, unless the placement group itself
                # is gone (its owner is shutting down).
                log.warning("restart attempt %d of the model group failed: %s", attempt, _short(exc))
                self._kill_all()
                if placement_group_table(self.placement.placement_group).get("state") == "REMOVED":
                    raise RuntimeError("the model group's placement group was removed") from exc
                await within_deadline(asyncio.sleep(RESTART_RETRY_S))
        raise AssertionError("unreachable")

    async def _restart(self, within_deadline) -> list[dict]:
        """Start every worker into its bundle, rendezvous, join; their `where()` answers.

        Raises BundlesMoved when Ray moves a bundle meanwhile: the node it was on died, and
        a worker started there would wait on it forever.
        """
        pg = self.placement.placement_group
        await within_deadline(_awaited(pg.ready()))
        watcher = asyncio.ensure_future(_until_moved(pg, _layout(pg)))
        starting = asyncio.ensure_future(self._start_and_join())
        try:
            await within_deadline(asyncio.wait({watcher, starting}, return_when=asyncio.FIRST_COMPLETED))
        finally:
            for task in (watcher, starting):
                task.cancel()
        if starting.done() and not starting.cancelled():
            return starting.result()
        raise BundlesMoved("a bundle of the model group moved to another node while its workers started")

    async def _start_and_join(self) -> list[dict]:
        self._start_all()
        workers = self.workers
        devices = await asyncio.gather(*[_awaited(w.rank_device.remote()) for w in workers])
        self.backend = self._choose_backend(list(devices))
        addr, port = await _awaited(workers[0].rendezvous_address.remote())
        self.rendezvous = (addr, port)
        await asyncio.gather(*[_awaited(w.join.remote(addr, port, self.backend)) for w in workers])
        return await asyncio.gather(*[_awaited(w.where.remote()) for w in workers])

    def _kill_all(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)

    # -- observability ----------------------------------------------------------------------

    def where(self) -> list[dict]:
        return ray.get([w.where.remote() for w in self.workers])

    def memory_reports(self) -> tuple[MemoryReport, ...]:
        """Each attention worker's weights and KV cache, in rank order."""
        return tuple(ray.get([w.memory_report.remote() for w in self.attention]))

    def dispatch_stats(self) -> list:
        return ray.get([w.dispatch_stats.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        if self.placement.owned:
            remove_placement_group(self.placement.placement_group)


class BundlesMoved(Exception):
    """Ray rescheduled a bundle of the placement group while workers were starting in it."""


def _layout(pg: PlacementGroup) -> tuple[str, dict]:
    table = placement_group_table(pg)
    return table.get("state", ""), dict(table.get("bundles_to_node_id", {}))


async def _until_moved(pg: PlacementGroup, layout: tuple[str, dict], poll_s: float = 0.5) -> None:
    while _layout(pg) == layout:
        await asyncio.sleep(poll_s)


async def _until_dead(actors: list, poll_s: float = 0.2) -> None:
    while not all(_actor_state(a) == "DEAD" for a in actors):
        await asyncio.sleep(poll_s)


def _actor_state(actor) -> str:
    """The GCS's view of an actor: ALIVE, RESTARTING, DEAD, ... ("" when unknown).

    Ray's public state API (ray.util.state) needs the dashboard, which a cluster may run
    without; the GCS table behind it is always there.
    """
    from ray._private import state

    return state.actors(actor_id=actor._actor_id.hex()).get("State", "")


async def _awaited(ref):
    """An ObjectRef as a coroutine, so asyncio can wait on, time out and cancel it."""
    return await ref


def _short(exc: BaseException, limit: int = 300) -> str:
    """An exception in one line: Ray's wrap the remote traceback, which logs already carry."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"
