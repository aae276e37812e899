"""The Ray executor: a model group of A attention workers + X expert workers, one bundle each.

The engine drives the group with one Ray call per worker per step (`execute`); all
per-layer traffic stays inside the workers' all-to-all collectives. It implements the
`Executor` protocol of cluster/executor.py.

Faults (DESIGN.md §5). `execute` is also the step watchdog: a worker that died, a
collective that raised, or a step that did not finish within `step_timeout_s` (a peer
stopped mid-collective) becomes a `WorkerFailed` naming the worker (cluster/fault_diagnosis.py).
`recover` then replaces the whole group in its bundles (cluster/group_restart.py).
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actor_state import actor_id
from cluster.fault_config import DEFAULT_STEP_TIMEOUT_S
from cluster.fault_diagnosis import Roster, diagnose
from cluster.group_restart import restart_group
from cluster.ray_await import awaited
from cluster.reservation import Reservation, reserve
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

FAILURE_GRACE_S = 2.0  # after the first error, how long the others get to report theirs


class RayExecutor:
    """Same members as LocalExecutor; its workers can fail, and `recover` replaces them."""

    def __init__(self, spec: GroupSpec, topology: TopologyConfig, reservation: Reservation | None = None,
                 ready_timeout_s: float = 300.0, step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S) -> None:
        if (topology.num_attention_workers, topology.world_size) != (spec.num_attention_workers,
                                                                     spec.world_size):
            raise ValueError("topology and group spec disagree on worker counts")
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        self.spec = spec
        self.topology = topology
        self.step_timeout_s = step_timeout_s
        self.reservation = reservation or reserve(topology)
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
            placement_group=self.reservation.placement_group,
            placement_group_bundle_index=self.reservation.bundle_index(rank),
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

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> tuple[StepOutput, ...]:
        refs = [w.execute.remote(b) for w, b in zip(self.attention, batches, strict=True)]
        # Expert workers follow the mode every attention worker's batch carries (cluster/dispatch_mode.py).
        refs += [w.execute.remote(batches[0].low_latency_tokens) for w in self.experts]
        calls = [asyncio.ensure_future(awaited(ref)) for ref in refs]
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
        raise WorkerFailed(await diagnose(calls, self.workers, self._roster(), stalled=stalled,
                                          step_timeout_s=self.step_timeout_s))

    def _roster(self) -> Roster:
        return Roster(kinds=tuple(self.kind_of(rank) for rank in range(self.spec.world_size)),
                      actor_ids=tuple(actor_id(w) for w in self.workers), node_ids=dict(self._nodes))

    async def recover(self, fault: WorkerFault, timeout_s: float) -> tuple[str, ...]:
        """Replace every worker and re-form the process group; returns the kinds restarted.

        Raises TimeoutError when the group is not back within `timeout_s`.
        """
        where = await restart_group(self, timeout_s)
        self._nodes = {info["rank"]: info.get("node_id") for info in where}
        return tuple(self.kind_of(rank) for rank in range(self.spec.world_size))

    async def start_and_join(self) -> list[dict]:
        """Start every worker into its bundle, rendezvous, join; their `where()` answers."""
        self._start_all()
        workers = self.workers
        devices = await asyncio.gather(*[awaited(w.rank_device.remote()) for w in workers])
        self.backend = self._choose_backend(list(devices))
        addr, port = await awaited(workers[0].rendezvous_address.remote())
        self.rendezvous = (addr, port)
        await asyncio.gather(*[awaited(w.join.remote(addr, port, self.backend)) for w in workers])
        return await asyncio.gather(*[awaited(w.where.remote()) for w in workers])

    def kill_all(self) -> None:
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
        for w in self.workers:
            ray.kill(w)
        self.reservation.release()
