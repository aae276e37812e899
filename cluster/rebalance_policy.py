"""Whether and how to move experts between expert workers: pure decisions over observed load.

`load` everywhere is tokens per (layer, expert) over a recent window (cluster/load_window.py);
keys that are missing count as 0. The cost model: each MoE layer waits for its busiest expert
worker, so what a placement costs is the sum over layers of the busiest worker's tokens, and
`imbalance` is that cost against a perfect spread (the mean worker's tokens, per layer).

A move is proposed only when it pays: enough tokens to go on, an imbalance past the
threshold, and a new placement that cuts it by at least `min_gain` of itself. Moving
experts costs weight transfers and a pause, so a small gain is not worth one. Every new
placement has its workers relabelled to keep the most copies where they are
(cluster/placement_alignment.py): the packing fixes which experts share a worker, the
alignment which process that worker is, so only the copies that must move are loaded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.elastic_config import RebalanceConfig
from cluster.placement import LayerExpert, Placement, place_experts, replicate_hot_experts
from cluster.placement_alignment import align_to, copies_kept

ExpertCopy = tuple[int, int, int]  # (layer, expert, worker)
MAX_DROP_CANDIDATES = 256  # sets of workers a scale-down weighs (C(16, 2) = 120)


@dataclass(frozen=True)
class Proposal:
    placement: Placement
    imbalance_before: float
    imbalance_after: float  # == imbalance(placement, load) for the load it was proposed from


def imbalance(placement: Placement, load: Mapping[LayerExpert, float]) -> float:
    """Σ_layers busiest worker's load / Σ_layers mean worker load; 1.0 without load (nothing to wait for)."""
    busiest = 0.0
    mean = 0.0
    for layer in range(placement.num_layers):
        loads = placement.worker_loads(layer, load)
        busiest += max(loads)
        mean += sum(loads) / len(loads)
    return busiest / mean if mean > 0 else 1.0


def propose_rebalance(current: Placement, load: Mapping[LayerExpert, float],
                      cfg: RebalanceConfig) -> Proposal | None:
    """A better placement for `load` on the same workers, or None when a move would not pay.

    Deterministic: the same placement, load and config give the same answer on every node.
    `cfg.enabled` is the caller's business; this only decides.
    """
    full = _full_load(current, load)
    if sum(full.values()) < cfg.min_tokens:
        return None
    before = imbalance(current, load)
    if before < cfg.threshold:
        return None
    new = align_to(current, _balanced(current.num_layers, current.num_experts, current.num_expert_workers,
                                      full, cfg.extra_copies_per_layer))
    after = imbalance(new, load)
    if not after < before * (1 - cfg.min_gain):
        return None
    return Proposal(placement=new, imbalance_before=before, imbalance_after=after)


def place_for_workers(current: Placement, num_workers: int, load: Mapping[LayerExpert, float] | None,
                      extra_copies_per_layer: int = 0, kept: Sequence[int] | None = None) -> Placement:
    """The placement of `current`'s layers and experts on a pool grown or shrunk to `num_workers`.

    With load (some tokens in it): balanced by it, one copy per expert plus
    `extra_copies_per_layer` replicas of the hottest (clamped to what fits). Without: the
    contiguous default, one copy each. Aligned to `current` for a resize that keeps the workers
    `kept` in that order (default 0..min(W, W')-1: a scale-down drops the last ones, a scale-up
    appends).
    """
    return align_to(current, _packed(current, num_workers, load, extra_copies_per_layer), kept)


def _packed(current: Placement, num_workers: int, load: Mapping[LayerExpert, float] | None,
            extra_copies_per_layer: int = 0) -> Placement:
    """Which experts share a worker on `num_workers` workers (labels not yet aligned)."""
    if extra_copies_per_layer < 0:
        raise ValueError(f"extra_copies_per_layer must be >= 0, got {extra_copies_per_layer}")
    full = None if load is None else _full_load(current, load)
    if full is None or sum(full.values()) == 0:
        return place_experts(current.num_layers, current.num_experts, num_workers)
    return _balanced(current.num_layers, current.num_experts, num_workers, full, extra_copies_per_layer)


def cheapest_to_drop(current: Placement, num_workers: int, load: Mapping[LayerExpert, float] | None,
                     max_candidates: int = MAX_DROP_CANDIDATES) -> tuple[Placement, tuple[int, ...]]:
    """For a pool shrunk to `num_workers`: the placement and the workers that leave, chosen so that
    the survivors load the fewest copies (every choice gives the same balance: the packing does
    not depend on which workers stay). Ties, and pools with more than `max_candidates` choices,
    drop the last workers."""
    if not 1 <= num_workers <= current.num_expert_workers:
        raise ValueError(f"a pool of {current.num_expert_workers} cannot shrink to {num_workers}")
    everyone = range(current.num_expert_workers)
    choices = list(itertools.combinations(everyone, current.num_expert_workers - num_workers))
    if len(choices) > max_candidates:
        choices = [tuple(everyone[num_workers:])]
    packed = _packed(current, num_workers, load)
    best: tuple[int, Placement, tuple[int, ...]] | None = None
    for dropped in reversed(choices):  # the last workers first: they win ties
        kept = [w for w in everyone if w not in dropped]
        aligned = align_to(current, packed, kept)
        score = copies_kept(current, aligned, kept)
        if best is None or score > best[0]:
            best = (score, aligned, dropped)
    assert best is not None
    return best[1], best[2]


def moved_copies(old: Placement, new: Placement) -> tuple[ExpertCopy, ...]:
    """(layer, expert, worker) copies `new` has and `old` lacks: the weights to load before switching."""
    _check_same_model(old, new)
    return tuple(sorted(_copies(new) - _copies(old)))


def freed_copies(old: Placement, new: Placement) -> tuple[ExpertCopy, ...]:
    """(layer, expert, worker) copies `old` has and `new` lacks: the weights to drop after switching."""
    _check_same_model(old, new)
    return tuple(sorted(_copies(old) - _copies(new)))


def _balanced(num_layers: int, num_experts: int, num_workers: int, full: dict[LayerExpert, float],
              extra_copies_per_layer: int) -> Placement:
    # Each expert can have at most one copy per worker: beyond that the extra copies do not fit.
    extra = min(extra_copies_per_layer, num_experts * (num_workers - 1))
    replicas = replicate_hot_experts(full, num_workers, extra) if extra > 0 else None
    return place_experts(num_layers, num_experts, num_workers, replicas=replicas, load=full)


def _full_load(placement: Placement, load: Mapping[LayerExpert, float]) -> dict[LayerExpert, float]:
    """`load` on every (layer, expert) of the placement, missing keys as 0; refuses keys outside it."""
    for (layer, expert), v in load.items():
        if not (0 <= layer < placement.num_layers and 0 <= expert < placement.num_experts):
            raise ValueError(f"load names (layer, expert) = {(layer, expert)}, outside "
                             f"{placement.num_layers} layers × {placement.num_experts} experts")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"load[{(layer, expert)}] = {v!r}: must be finite and >= 0")
    return {(layer, e): float(load.get((layer, e), 0.0))
            for layer in range(placement.num_layers) for e in range(placement.num_experts)}


def _copies(p: Placement) -> set[ExpertCopy]:
    return {(layer, e, w) for layer, experts in enumerate(p.workers_by_layer)
            for e, ws in enumerate(experts) for w in ws}


def _check_same_model(old: Placement, new: Placement) -> None:
    if (old.num_layers, old.num_experts) != (new.num_layers, new.num_experts):
        raise ValueError(f"placements of different models: {old.num_layers}×{old.num_experts} "
                         f"vs {new.num_layers}×{new.num_experts} (layers × experts)")
