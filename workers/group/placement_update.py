"""A new expert placement for a running group (crosses the actor boundary; issue 16).

The engine sends one to every worker ahead of time (`prepare_placement`): an expert worker loads
the copies it will hold and lacks, memory-mapped from the checkpoint, while steps go on. The
switch happens at a step boundary: either the first step whose message carries `version`
(same workers, same process group: a rebalance), or the next `join` (the process group re-formed
with workers added or removed; a worker's rank may change then).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.moe.expert_map import ExpertMap


@dataclass(frozen=True)
class PlacementUpdate:
    version: int  # increases by one per placement; 0 is the one the group started with
    expert_map: ExpertMap
    rank: int  # this worker's rank under the new map (attention ranks never change)

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"a placement update has version >= 1, got {self.version}")
        if not 0 <= self.rank < self.expert_map.world_size:
            raise ValueError(f"rank {self.rank} is outside the new world of {self.expert_map.world_size}")
