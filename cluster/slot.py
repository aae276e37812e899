"""Where one worker of a model group runs: a bundle of a placement group.

The group's first workers take the bundles of its reservation (cluster/reservation.py), which
lives as long as the group (or its Serve replica). A worker added later (an expert pool that
scales up) gets a placement group of its own, one bundle, removed when that worker leaves; a
bundle of the reservation that a scale-down empties stays reserved and is reused first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from cluster.ray_await import awaited
from cluster.resource_check import describe_missing


@dataclass(frozen=True)
class Slot:
    placement_group: PlacementGroup
    bundle_index: int
    owned: bool = False  # a placement group of its own: removed when the slot is released

    def release(self) -> None:
        if self.owned:
            remove_placement_group(self.placement_group)


async def reserve_slot(bundle: dict[str, float], timeout_s: float) -> Slot:
    """A one-bundle placement group for one more worker; TimeoutError naming what is missing.

    On a Ray cluster with an autoscaler (KubeRay), a pending bundle is what makes it add a node."""
    pg = placement_group([bundle], strategy="PACK")
    try:
        await asyncio.wait_for(awaited(pg.ready()), timeout_s)
    except TimeoutError:
        import ray

        remove_placement_group(pg)
        missing = describe_missing([bundle], ray.available_resources())
        raise TimeoutError(f"no room for another worker {bundle} within {timeout_s:.0f}s: "
                           f"{missing or 'the resources exist but are taken'}") from None
    return Slot(pg, 0, owned=True)
