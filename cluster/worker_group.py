"""A model group on Ray: A attention workers + X expert workers, one bundle each.

The engine drives the group with one Ray call per worker per step (`execute`); all
per-layer traffic stays inside the workers' all-to-all collectives.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.topology import TopologyConfig, worker_bundles
from workers.attention_worker import AttentionWorker
from workers.batch_spec import ScheduledBatch
from workers.expert_worker import ExpertWorker
from workers.group_spec import GroupSpec
from workers.step_output import StepOutput


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
    pg = placement_group(worker_bundles(topology), strategy=topology.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise TimeoutError(f"could not reserve {worker_bundles(topology)} ({topology.strategy}) "
                           f"within {timeout_s:.0f}s: not enough resources in the cluster")
    return GroupPlacement(pg, 0, owned=True)


class RayWorkerGroup:
    """The Ray executor: same interface as LocalExecutor."""

    def __init__(self, spec: GroupSpec, topology: TopologyConfig, placement: GroupPlacement | None = None,
                 ready_timeout_s: float = 300.0) -> None:
        if (topology.num_attention_workers, topology.world_size) != (spec.num_attention_workers,
                                                                     spec.world_size):
            raise ValueError("topology and group spec disagree on worker counts")
        self.spec = spec
        self.topology = topology
        self.placement = placement or reserve(topology)
        self.num_attention_workers = spec.num_attention_workers
        bundles = worker_bundles(topology)
        self.workers = [self._start(rank, bundles[rank]) for rank in range(spec.world_size)]
        self.attention = self.workers[: spec.num_attention_workers]
        self.experts = self.workers[spec.num_attention_workers:]
        addr, port = ray.get(self.workers[0].rendezvous_address.remote(), timeout=ready_timeout_s)
        self.rendezvous = (addr, port)
        ray.get([w.join.remote(addr, port) for w in self.workers], timeout=ready_timeout_s)

    def _start(self, rank: int, bundle: dict[str, float]):
        cls = AttentionWorker if rank < self.spec.num_attention_workers else ExpertWorker
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement.placement_group,
            placement_group_bundle_index=self.placement.first_bundle + rank,
        )
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        actor = ray.remote(cls).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), resources=custom or None,
            scheduling_strategy=strategy, max_concurrency=2,
            name=None,
        )
        return actor.remote(self.spec, rank)

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> tuple[StepOutput, ...]:
        refs = [w.execute.remote(b) for w, b in zip(self.attention, batches, strict=True)]
        refs += [w.execute.remote() for w in self.experts]
        results = await asyncio.gather(*refs)
        return tuple(results[: self.num_attention_workers])

    def where(self) -> list[dict]:
        return ray.get([w.where.remote() for w in self.workers])

    def dispatch_stats(self) -> list:
        return ray.get([w.dispatch_stats.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        if self.placement.owned:
            remove_placement_group(self.placement.placement_group)
