"""Expert placement: a pure map (layer, expert) → the expert worker(s) holding a copy.

Three rules, all deterministic (the same inputs give the same placement on every node):

- Nothing known (no load, no replicas): each layer is split into contiguous runs, as even
  as possible (8 experts on 3 workers → 3/3/2). The workers that get the longer runs rotate
  from layer to layer so that, over the whole model, every worker holds about as many
  expert weights.
- Load known and/or replicas asked for: greedy longest-processing-time packing, as in
  DeepSeek's EPLB. Every copy carries load / number-of-copies (dispatch splits a replicated
  expert's tokens evenly); experts go heaviest copy first, their copies to the least-loaded
  workers that still have room: at most ceil(copies / workers) copies per worker and
  layer, always, so memory stays balanced. Ties go to the worker with more room, then
  fewer copies over earlier layers, then the lower index.
- Replicas of one expert always sit on distinct workers, so an expert cannot have more
  copies than there are workers.

`replicate_hot_experts` decides the replica counts from observed load (EPLB's
"redundant experts"): each extra slot goes to the expert with the highest load per copy.

Worker indices here are 0..num_expert_workers-1; `Placement.to_expert_map` turns them into
process-group ranks, after the attention ranks.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass

from workers.moe.expert_map import ExpertMap

LayerExpert = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Placement:
    num_experts: int
    num_expert_workers: int
    workers_by_layer: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][expert] → workers, ascending

    @property
    def num_layers(self) -> int:
        return len(self.workers_by_layer)

    def workers_of(self, layer: int, expert: int) -> tuple[int, ...]:
        return self.workers_by_layer[layer][expert]

    def experts_on(self, layer: int, worker: int) -> tuple[int, ...]:
        return tuple(e for e, ws in enumerate(self.workers_by_layer[layer]) if worker in ws)

    def num_copies_on(self, worker: int) -> int:
        """Expert weights this worker holds over all layers (what its memory must fit)."""
        return sum(len(self.experts_on(layer, worker)) for layer in range(self.num_layers))

    def worker_loads(self, layer: int, load: Mapping[LayerExpert, float]) -> tuple[float, ...]:
        """Each worker's share of a layer's load, a replicated expert's load split evenly."""
        out = [0.0] * self.num_expert_workers
        for e, ws in enumerate(self.workers_by_layer[layer]):
            for w in ws:
                out[w] += load.get((layer, e), 0.0) / len(ws)
        return tuple(out)

    @classmethod
    def from_expert_map(cls, expert_map: ExpertMap, first_expert_rank: int) -> Placement:
        """The placement behind a group's expert map (expert worker w is rank first_expert_rank + w)."""
        num_workers = expert_map.world_size - first_expert_rank
        layers = tuple(
            tuple(tuple(rank - first_expert_rank for rank, _ in expert_map.replicas(layer, e))
                  for e in range(expert_map.num_experts))
            for layer in range(expert_map.num_layers))
        return cls(num_experts=expert_map.num_experts, num_expert_workers=num_workers,
                   workers_by_layer=layers)

    def to_expert_map(self, first_expert_rank: int) -> ExpertMap:
        """Ranks [0, first_expert_rank) are attention ranks; expert worker w is rank first_expert_rank + w."""
        if first_expert_rank < 0:
            raise ValueError(f"first_expert_rank must be >= 0, got {first_expert_rank}")
        world_size = first_expert_rank + self.num_expert_workers
        local = tuple(
            tuple(() for _ in range(first_expert_rank))
            + tuple(self.experts_on(layer, w) for w in range(self.num_expert_workers))
            for layer in range(self.num_layers)
        )
        return ExpertMap(
            world_size=world_size, num_experts=self.num_experts,
            expert_ranks=tuple(range(first_expert_rank, world_size)), local_expert_ids=local,
        )


def place_experts(num_layers: int, num_experts: int, num_expert_workers: int,
                  replicas: Mapping[LayerExpert, int] | None = None,
                  load: Mapping[LayerExpert, float] | None = None) -> Placement:
    """Place every (layer, expert), with `replicas[(layer, expert)]` copies (default 1).

    `load` is observed tokens per (layer, expert) (missing: 0); it turns on greedy balancing.
    """
    _check_sizes(num_layers, num_experts, num_expert_workers)
    replicas = dict(replicas or {})
    for key, n in replicas.items():
        _check_key(key, num_layers, num_experts, "replicas")
        if not isinstance(n, int) or not 1 <= n <= num_expert_workers:
            raise ValueError(f"replicas[{key}] = {n!r}: copies must be an int in 1..{num_expert_workers} "
                             "(one per worker at most)")
    if load is not None:
        for key, v in load.items():
            _check_key(key, num_layers, num_experts, "load")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"load[{key}] = {v!r}: must be finite and >= 0")

    if load is None and all(n == 1 for n in replicas.values()):
        layers = [_contiguous_layer(layer, num_experts, num_expert_workers) for layer in range(num_layers)]
    else:
        copies_held = [0] * num_expert_workers
        layers = []
        for layer in range(num_layers):
            weights = [1.0 if load is None else float(load.get((layer, e), 0.0)) for e in range(num_experts)]
            copies = [replicas.get((layer, e), 1) for e in range(num_experts)]
            layers.append(_greedy_layer(weights, copies, num_expert_workers, copies_held))
    return Placement(num_experts=num_experts, num_expert_workers=num_expert_workers,
                     workers_by_layer=tuple(layers))


def replicate_hot_experts(load: Mapping[LayerExpert, float], num_expert_workers: int,
                          num_extra_slots: int) -> dict[LayerExpert, int]:
    """Copies per (layer, expert) of `load`'s keys, with `num_extra_slots` extra copies per layer.

    Each extra copy goes to the expert with the highest load per copy (ties: lower expert
    id), never beyond one copy per worker.
    """
    if num_expert_workers < 1:
        raise ValueError(f"need at least one expert worker, got {num_expert_workers}")
    if num_extra_slots < 0:
        raise ValueError(f"num_extra_slots must be >= 0, got {num_extra_slots}")
    by_layer: dict[int, list[int]] = {}
    for layer, e in sorted(load):
        if not math.isfinite(load[(layer, e)]) or load[(layer, e)] < 0:
            raise ValueError(f"load[{(layer, e)}] = {load[(layer, e)]!r}: must be finite and >= 0")
        by_layer.setdefault(layer, []).append(e)
    copies = {key: 1 for key in load}
    for layer, experts in by_layer.items():
        room = len(experts) * (num_expert_workers - 1)
        if num_extra_slots > room:
            raise ValueError(f"layer {layer}: {num_extra_slots} extra copies do not fit; {len(experts)} "
                             f"experts on {num_expert_workers} workers leave room for {room}")
        for _ in range(num_extra_slots):
            open_ = [e for e in experts if copies[(layer, e)] < num_expert_workers]
            hot = max(open_, key=lambda e: (load[(layer, e)] / copies[(layer, e)], -e))
            copies[(layer, hot)] += 1
    return copies


def _contiguous_layer(layer: int, num_experts: int, num_workers: int) -> tuple[tuple[int, ...], ...]:
    base, extra = divmod(num_experts, num_workers)
    # Which workers get base+1 rotates with the layer: worker w is "long" in this layer when
    # (w - layer·extra) mod W < extra, so over W layers each worker is long `extra` times.
    sizes = [base + ((w - layer * extra) % num_workers < extra) for w in range(num_workers)]
    workers: list[tuple[int, ...]] = []
    for w, n in enumerate(sizes):
        workers.extend([(w,)] * n)
    return tuple(workers)


def _greedy_layer(weights: list[float], copies: list[int], num_workers: int,
                  copies_held: list[int]) -> tuple[tuple[int, ...], ...]:
    """EPLB-style packing of one layer; `copies_held` (over earlier layers) is updated in place.

    An expert's copies are placed together, on the least-loaded workers with room. When
    that choice would leave the experts still to come no way to fit (too few workers with
    room for an expert's distinct copies), the copies go to the workers with the most room
    instead, which always leaves a way (the exchange argument behind Gale–Ryser).
    """
    max_per_worker = math.ceil(sum(copies) / num_workers)
    room = [max_per_worker] * num_workers
    worker_load = [0.0] * num_workers
    holders: list[tuple[int, ...]] = [() for _ in weights]
    order = sorted(range(len(weights)), key=lambda e: (-weights[e] / copies[e], e))
    for i, e in enumerate(order):
        roomy = [w for w in range(num_workers) if room[w]]
        chosen = sorted(roomy, key=lambda w: (worker_load[w], -room[w], copies_held[w], w))[:copies[e]]
        rest = [copies[later] for later in order[i + 1:]]
        if not _fits(rest, [room[w] - (w in chosen) for w in range(num_workers)]):
            chosen = sorted(roomy, key=lambda w: (-room[w], worker_load[w], copies_held[w], w))[:copies[e]]
        for w in chosen:
            worker_load[w] += weights[e] / copies[e]
            room[w] -= 1
            copies_held[w] += 1
        holders[e] = tuple(sorted(chosen))
    return tuple(holders)


def _fits(rows: list[int], rooms: list[int]) -> bool:
    """Can experts needing `rows` copies each (on distinct workers) fit in workers with `rooms` free?

    Gale–Ryser: yes iff for every k the k largest rows need at most sum(min(room, k)).
    For k beyond the largest room the right side is the total room, so a total check covers it.
    """
    if sum(rows) > sum(rooms):
        return False
    top = heapq.nlargest(min(len(rows), max(rooms, default=0)), rows)
    need = 0
    for k, r in enumerate(top, start=1):
        need += r
        if need > sum(min(c, k) for c in rooms):
            return False
    return True


def _check_sizes(num_layers: int, num_experts: int, num_expert_workers: int) -> None:
    if num_expert_workers < 1:
        raise ValueError(f"need at least one expert worker, got {num_expert_workers}")
    if num_layers < 1:
        raise ValueError(f"need at least one layer, got {num_layers}")
    if num_experts < 1:
        raise ValueError(f"need at least one expert per layer, got {num_experts}")


def _check_key(key: LayerExpert, num_layers: int, num_experts: int, what: str) -> None:
    layer, expert = key
    if not (0 <= layer < num_layers and 0 <= expert < num_experts):
        raise ValueError(f"{what} names (layer, expert) = {key}, "
                         f"outside {num_layers} layers × {num_experts} experts")
