"""The Ray executor: a model group of A attention workers + X expert workers, one bundle each.

How a step reaches the workers (`control`):
- "channel" (the default): every worker runs a long-lived step loop, started by Ray calls at
  set-up (cluster/step_loops.py); each step is written once into a shared-memory ring for the
  workers on the engine's node, and sent over TCP to those on other nodes; results come back
  on each worker's socket (cluster/step_broadcast.py). No Ray call per step.
- "ray": one Ray actor call per worker per step (`execute_over_ray`), the reference path; it
  works on a "channel" group too (benchmarks compare both on the same workers), and a
  "channel" group falls back to it, with a warning, when the channel cannot be set up.
Either way all per-layer traffic stays inside the workers' all-to-all collectives. Ray calls
carry set-up, recovery, stats and shutdown. It implements the `Executor` protocol of
cluster/executor.py.

Faults (DESIGN.md §5). A step is also the watchdog: a worker that died (its Ray call, or its
step loop's, fails with RayActorError; on the channel its socket closes first), a step that
raised (a Ray task error, or the failure its loop reports back), or a step that did not finish
within `step_timeout_s` (a peer stopped mid-collective) becomes a `WorkerFailed` naming the
worker (cluster/fault_diagnosis.py). `recover` then repairs the one worker that failed
(cluster/worker_repair.py: the survivors keep their weights and KV caches), or, when that
cannot be done, restarts the whole group in its bundles (cluster/group_restart.py); either way
the group's step loops start again.

The expert plane changes shape while serving (cluster/group_reshape.py): a new placement
switches at a step boundary (`placement_version` travels with every step), and a resize
re-forms the process group between two steps. The step lock keeps steps, recoveries and
re-forms apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

import ray
from ray.exceptions import RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actor_state import actor_id
from cluster.decode_graphs import GroupGraphs
from cluster.fault_config import DEFAULT_STEP_TIMEOUT_S
from cluster.fault_diagnosis import Roster, diagnose, one_line
from cluster.group_restart import restart_group
from cluster.listeners import notify
from cluster.placement import Placement
from cluster.plane_actions import grow_back
from cluster.plane_event import PlaneEvent
from cluster.ray_await import awaited
from cluster.recovery_event import Repair
from cluster.reservation import Reservation, reserve
from cluster.slot import Slot, reserve_slot
from cluster.step_broadcast import StepChannelClosed
from cluster.step_loops import StepLoops, open_step_loops, open_step_loops_async
from cluster.topology import TopologyConfig, worker_bundle, worker_bundles
from cluster.worker_fault import WorkerFailed, WorkerFault
from cluster.worker_repair import repair_one
from workers.comm.collective_backend import RankDevice, choose_backend, describe_choice
from workers.device.memory import MemoryReport
from workers.group.attention_worker import AttentionWorker
from workers.group.expert_worker import ExpertWorker
from workers.group.spec import GroupSpec
from workers.group.step_message import StepMessage
from workers.model.batch_spec import ScheduledBatch
from workers.model.step_output import StepOutput

log = logging.getLogger(__name__)

FAILURE_GRACE_S = 2.0  # after the first error, how long the others get to report theirs
CONTROLS = ("channel", "ray")
# Rank 0 hosts the rendezvous store: the others join a moment later, so that their first connect
# finds it listening (a refused connect backs off for about half a second; measured here).
STORE_HEAD_START_S = 0.05  # how a step reaches the workers; see the module's docstring


class RayExecutor:
    """Same members as LocalExecutor; its workers can fail, and `recover` replaces them."""

    def __init__(self, spec: GroupSpec, topology: TopologyConfig, reservation: Reservation | None = None,
                 ready_timeout_s: float = 300.0, step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
                 control: str = "channel") -> None:
        if (topology.num_attention_workers, topology.world_size) != (spec.num_attention_workers,
                                                                     spec.world_size):
            raise ValueError("topology and group spec disagree on worker counts")
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
        self.spec = spec
        self.topology = topology
        self.step_timeout_s = step_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.control = control
        self.loops: StepLoops | None = None  # the workers' step loops ("channel" only)
        self.reservation = reservation or reserve(topology)
        self.num_attention_workers = spec.num_attention_workers
        self.slots = [Slot(self.reservation.placement_group, self.reservation.bundle_index(rank))
                      for rank in range(spec.world_size)]  # by rank
        self.free_slots: list[Slot] = []  # bundles of the reservation a scale-down emptied
        self.placement = Placement.from_expert_map(spec.expert_map, spec.num_attention_workers)
        self.placement_version = spec.placement_version
        # The expert-worker count the group keeps: a repair that drops a dead worker grows back
        # to it (cluster/expert_plane.py); the expert autoscaler moves it.
        self.target_expert_workers = topology.num_expert_workers
        self.plane_listeners: list = []  # called with every PlaneEvent (metrics, tests)
        self.reshaping = False  # an expert-plane change is under way (cluster/plane_actions.py)
        self.recent_load: dict | None = None  # tokens per (layer, expert) lately, set by the expert plane
        self.background: set[asyncio.Task] = set()  # e.g. growing back after a repair
        self.closed = False
        self.repair_alone = True  # False: every fault restarts the whole group (benchmarks compare both)
        self.graphs = GroupGraphs()  # decode CUDA graphs in the workers (cluster/decode_graphs.py)
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._start_all()
        devices = ray.get([w.rank_device.remote() for w in self.workers], timeout=ready_timeout_s)
        self.backend = self._choose_backend(devices)
        addr, port = ray.get(self.workers[0].rendezvous_address.remote(), timeout=ready_timeout_s)
        self.rendezvous = (addr, port)
        joins = [self.workers[0].join.remote(addr, port, self.backend)]
        time.sleep(STORE_HEAD_START_S)  # see form_group
        joins += [w.join.remote(addr, port, self.backend) for w in self.workers[1:]]
        ray.get(joins, timeout=ready_timeout_s)
        self._nodes = {info["rank"]: info.get("node_id") for info in self.where()}
        if control == "channel":
            self._open_loops_or_fall_back()

    def _open_loops_or_fall_back(self) -> None:
        """Start the step loops; where the channel itself cannot be set up (a worker cannot reach
        the engine's listener, no shared memory here), step over Ray calls instead, and say why."""
        try:
            self.loops = open_step_loops(self.workers, self._node_list(), self.num_attention_workers,
                                         self.ready_timeout_s)
        except (OSError, RayTaskError) as exc:
            if isinstance(exc, RayTaskError) and not isinstance(exc.cause, OSError):
                raise
            log.warning("model group: the step channel could not be set up (%s); every step will be "
                        "a Ray call per worker", one_line(exc))
            self.control = "ray"

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
        return self.start_in(self.slots[rank], rank, self.spec, bundle)

    def start_in(self, slot: Slot, rank: int, spec: GroupSpec, bundle: dict[str, float] | None = None):
        """A worker for `rank` of `spec`'s group, in `slot`'s bundle (it loads its weights as it starts)."""
        cls = AttentionWorker if rank < self.spec.num_attention_workers else ExpertWorker
        bundle = bundle or worker_bundle(self.topology, self.kind_of(rank))
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=slot.placement_group, placement_group_bundle_index=slot.bundle_index,
        )
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        actor = ray.remote(cls).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), resources=custom or None,
            # 3 threads: the step loop (all along), a Ray-call step (the reference path), and probes
            # and stats, which must answer while a step is stuck in a collective.
            scheduling_strategy=strategy, max_concurrency=3,
            name=None,
        )
        return actor.remote(spec, rank)

    @property
    def num_expert_workers(self) -> int:
        return len(self.workers) - self.num_attention_workers

    def step_lock(self) -> asyncio.Lock:
        """Held by a step, a recovery, or the pause of a re-form: one at a time (one per event loop)."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        return self._lock[1]

    def set_placement(self, placement: Placement, version: int, spec: GroupSpec) -> None:
        """From the next step on, the group runs on `placement` (every worker prepared it)."""
        self.placement, self.placement_version = placement, version
        self.graphs.stale = True  # the workers drop their graphs when they switch
        self.spec = dataclasses.replace(spec, expert_map=placement.to_expert_map(self.num_attention_workers),
                                        placement_version=version)
        self.topology = dataclasses.replace(self.topology, num_expert_workers=placement.num_expert_workers)

    def set_members(self, workers: list, slots: list[Slot]) -> None:
        self.workers, self.slots = list(workers), list(slots)
        self.attention = self.workers[: self.num_attention_workers]
        self.experts = self.workers[self.num_attention_workers:]

    async def acquire_slot(self) -> Slot:
        """A bundle for one more expert worker: an emptied one of the reservation, else a new one."""
        if self.free_slots:
            return self.free_slots.pop()
        return await reserve_slot(worker_bundle(self.topology, "expert"), self.ready_timeout_s)

    def release_slot(self, slot: Slot) -> None:
        if slot.owned:
            slot.release()
        else:
            self.free_slots.append(slot)

    def emit(self, event: PlaneEvent) -> None:
        notify(self.plane_listeners, event, "expert-plane")

    def kind_of(self, rank: int) -> str:
        return self.topology.rank_kind(rank)

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> tuple[StepOutput, ...]:
        async with self.step_lock():
            run = self.execute_over_channel if self.control == "channel" else self.execute_over_ray
            outputs = await run(batches)
            if self.graphs.stale:  # this step switched placements (or the engine's config just came)
                await self.graphs.capture(self.workers, self.backend)
            return outputs

    async def execute_over_channel(self, batches: tuple[ScheduledBatch, ...]) -> tuple[StepOutput, ...]:
        """One step through the workers' step loops: no Ray call."""
        loops = self.loops
        if loops is None:
            raise RuntimeError(f"this group runs no step loops (control {self.control!r})")
        # Expert workers follow the mode every attention worker's batch carries (cluster/dispatch_mode.py).
        message = StepMessage(batches[0].low_latency_tokens, batches, self.placement_version)
        seq = loops.broadcast.publish(message)
        calls = [asyncio.ensure_future(loops.broadcast.result(rank, seq))
                 for rank in range(self.spec.world_size)]
        return await self._finish_step(calls, loops.ended())

    async def execute_over_ray(self, batches: tuple[ScheduledBatch, ...]) -> tuple[StepOutput, ...]:
        """One step as one Ray actor call per worker: the reference control path."""
        version = self.placement_version
        refs = [w.execute.remote(b, version) for w, b in zip(self.attention, batches, strict=True)]
        refs += [w.execute.remote(batches[0].low_latency_tokens, version) for w in self.experts]
        return await self._finish_step([asyncio.ensure_future(awaited(ref)) for ref in refs], ())

    async def _finish_step(self, calls: list[asyncio.Future], ended: Sequence[asyncio.Future]
                           ) -> tuple[StepOutput, ...]:
        """The step's results, or WorkerFailed. `calls`: each rank's result; `ended`: each rank's
        step loop, which only ever ends with an error (none on the Ray-call path)."""
        step = asyncio.gather(*calls)
        step.add_done_callback(_retrieve)  # a failed step's errors are read from `calls`
        try:
            done, _ = await asyncio.wait([step, *ended], timeout=self.step_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if step in done and step.exception() is None:
                return tuple(step.result()[: self.num_attention_workers])
            stalled = not done
            if not stalled:  # one failed: the dead peer's own error usually follows at once
                await asyncio.wait([c for c in calls if not c.done()] + _deaths_to_come(calls, ended),
                                   timeout=FAILURE_GRACE_S)
        finally:
            for c in calls:
                if not c.done():
                    c.cancel()  # the actors are replaced; nobody waits for these any more
        if ended:  # a rank whose loop ended says why (it died) better than its unanswered step
            calls = [e if e.done() and not e.cancelled() else c for c, e in zip(calls, ended, strict=True)]
        raise WorkerFailed(await diagnose(calls, self.workers, self._roster(), stalled=stalled,
                                          step_timeout_s=self.step_timeout_s))

    def _roster(self) -> Roster:
        return Roster(kinds=tuple(self.kind_of(rank) for rank in range(self.spec.world_size)),
                      actor_ids=tuple(actor_id(w) for w in self.workers), node_ids=dict(self._nodes))

    async def recover(self, fault: WorkerFault, timeout_s: float) -> Repair:
        """Repair the failed worker alone (cluster/worker_repair.py), or restart every worker, and
        re-form the process group; says what was replaced and which KV caches were lost.

        The one-worker repair gets `timeout_s`; when it fails, the group restart gets `timeout_s`
        again. Raises TimeoutError when the group is not back within it.
        """
        async with self.step_lock():
            repair = await repair_one(self, fault, timeout_s) if self.repair_alone else None
            if repair is not None:
                return repair
            await self.restart_all(timeout_s)
            if self.num_expert_workers < self.target_expert_workers:
                grow_back(self)  # a repair that failed half-way had dropped a worker already
            return Repair("group", tuple(self.kind_of(rank) for rank in range(self.spec.world_size)),
                          tuple(range(self.num_attention_workers)))

    async def restart_all(self, timeout_s: float) -> None:
        """Every worker new, in its bundle, on the current placement (the step lock held)."""
        await restart_group(self, timeout_s)  # ends in form_group, which records the nodes

    async def start_and_join(self) -> list[dict]:
        """Start every worker into its bundle, rendezvous, join, start the step loops; their
        `where()` answers."""
        self._close_loops()
        self._start_all()
        return await self.form_group()

    def take_loops(self) -> StepLoops | None:
        """The step loops, which the caller now owns (a repair closes them once the dead worker is killed)."""
        loops, self.loops = self.loops, None
        return loops

    async def start_worker(self, rank: int) -> None:
        """A new worker for `rank` in its bundle (the old one is dead); returns once it answers."""
        self.workers[rank] = self._start(rank, worker_bundles(self.topology)[rank])
        self.set_members(self.workers, self.slots)
        await awaited(self.workers[rank].where.remote())

    def kill_worker(self, rank: int) -> None:
        ray.kill(self.workers[rank], no_restart=True)

    async def rejoin(self, rank: int) -> list[dict]:
        """The workers other than the new `rank` leave their process group (keeping their weights
        and KV caches); all rendezvous, join, start their step loops; their `where()` answers."""
        t0 = time.perf_counter()
        await asyncio.gather(*[awaited(w.leave.remote()) for r, w in enumerate(self.workers) if r != rank])
        where = await self.form_group()
        log.info("model group re-formed around a new rank %d in %.2fs", rank, time.perf_counter() - t0)
        return where

    async def form_group(self, placement_version: int | None = None) -> list[dict]:
        """Every worker (started, in no process group) rendezvous, joins (on `placement_version`,
        which the survivors of a resize prepared), starts its step loop."""
        workers = self.workers
        devices = await asyncio.gather(*[awaited(w.rank_device.remote()) for w in workers])
        self.backend = self._choose_backend(list(devices))
        addr, port = await awaited(workers[0].rendezvous_address.remote())
        self.rendezvous = (addr, port)
        joins = [w.join.remote(addr, port, self.backend, placement_version) for w in workers[:1]]
        await asyncio.sleep(STORE_HEAD_START_S)
        joins += [w.join.remote(addr, port, self.backend, placement_version) for w in workers[1:]]
        await asyncio.gather(*[awaited(ref) for ref in joins])
        where = await asyncio.gather(*[awaited(w.where.remote()) for w in workers])
        self._nodes = {info["rank"]: info.get("node_id") for info in where}
        await self.graphs.capture(workers, self.backend)  # a graph holds the process group it was made in
        if self.control == "channel":
            nodes = {info["rank"]: info.get("node_id") for info in where}
            self.loops = await open_step_loops_async(workers, [nodes[r] for r in range(len(workers))],
                                                     self.num_attention_workers, self.ready_timeout_s)
        return where

    def _node_list(self) -> list[str | None]:
        return [self._nodes.get(rank) for rank in range(self.spec.world_size)]

    def _close_loops(self) -> None:
        loops, self.loops = self.loops, None
        if loops is not None:
            loops.close()

    def kill_all(self) -> None:
        self._close_loops()
        for w in self.workers:
            ray.kill(w, no_restart=True)

    def where(self) -> list[dict]:
        return ray.get([w.where.remote() for w in self.workers])

    def memory_reports(self) -> tuple[MemoryReport, ...]:
        """Each attention worker's weights and KV cache, in rank order."""
        return tuple(ray.get([w.memory_report.remote() for w in self.attention]))

    def dispatch_stats(self) -> list:
        return ray.get([w.dispatch_stats.remote() for w in self.workers])

    def shutdown(self) -> None:
        self.closed = True
        for task in list(self.background):
            if not task.get_loop().is_closed():
                task.cancel()
        self._close_loops()
        for w in self.workers:
            ray.kill(w)
        for slot in self.slots + self.free_slots:
            slot.release()  # the slots scale-ups reserved; the reservation's own go with it
        self.reservation.release()


def _deaths_to_come(calls: list[asyncio.Future], ended: Sequence[asyncio.Future]) -> list[asyncio.Future]:
    """The step loops of ranks whose socket closed: their actor's death (RayActorError), which
    names the culprit without a probe, follows a moment later."""
    if not ended:
        return []
    return [e for c, e in zip(calls, ended, strict=True) if not e.done() and c.done() and not c.cancelled()
            and isinstance(c.exception(), StepChannelClosed)]


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
