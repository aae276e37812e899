"""Reserving a model group's resources: one placement group, one bundle per worker, in rank order."""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from cluster.resource_check import describe_missing
from cluster.topology import TopologyConfig, worker_bundles

DEFAULT_RESERVE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Reservation:
    """The placement group the workers go into, and the index of the first worker bundle.

    Inside a Serve replica, the replica's own bundle comes first (index 0) and the workers
    take the bundles after it; a standalone model group owns its placement group from index 0
    and removes it at shutdown.
    """

    placement_group: PlacementGroup
    first_bundle: int = 0
    owned: bool = False

    def bundle_index(self, rank: int) -> int:
        return self.first_bundle + rank

    def release(self) -> None:
        """Give the bundles back to Ray, if this reservation made them."""
        if self.owned:
            remove_placement_group(self.placement_group)


def reserve(topology: TopologyConfig, timeout_s: float = DEFAULT_RESERVE_TIMEOUT_S) -> Reservation:
    bundles = worker_bundles(topology)
    pg = placement_group(bundles, strategy=topology.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        missing = describe_missing(bundles, ray.available_resources())
        raise TimeoutError(f"could not reserve {bundles} ({topology.strategy}) within {timeout_s:.0f}s: "
                           f"{missing or 'the resources exist but not together as the strategy asks'}")
    return Reservation(pg, 0, owned=True)
