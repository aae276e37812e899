"""The placement of a pool that lost one expert worker: its copies go to the survivors (pure).

Used by the one-worker repair (cluster/group_reshape.py): the survivors take over the dead
worker's experts, which they load from the checkpoint while the group is paused, instead of
waiting for a new process to start and load. Nothing else moves, so the repair loads as
little as it can: a copy on the dead worker whose expert has another copy is simply dropped
(its tokens go to the other copies); an expert that had no other copy goes to the survivor
holding the fewest experts of that layer (then the fewest over all layers, then the lower
index). Survivors after the dead one shift down by one index, as their ranks do.
"""

from __future__ import annotations

from cluster.placement import Placement


def without_worker(placement: Placement, worker: int) -> Placement:
    if not 0 <= worker < placement.num_expert_workers:
        raise ValueError(f"worker {worker} is outside 0..{placement.num_expert_workers - 1}")
    if placement.num_expert_workers < 2:
        raise ValueError("the only expert worker cannot be removed: no survivor could take its experts")
    survivors = placement.num_expert_workers - 1
    held = [0] * survivors  # copies each survivor holds over the layers placed so far

    def shifted(ws: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(w - (w > worker) for w in ws if w != worker)

    layers = []
    for by_expert in placement.workers_by_layer:
        new = [shifted(ws) for ws in by_expert]
        in_layer = [sum(w in ws for ws in new) for w in range(survivors)]
        for e, ws in enumerate(new):
            if not ws:  # its only copy was on the lost worker
                w = min(range(survivors), key=lambda s: (in_layer[s], held[s], s))
                new[e] = (w,)
                in_layer[w] += 1
        for w in range(survivors):
            held[w] += in_layer[w]
        layers.append(tuple(new))
    return Placement(num_experts=placement.num_experts, num_expert_workers=survivors,
                     workers_by_layer=tuple(layers))
