"""Relabel a new placement's workers so that as many expert copies as possible stay where they are.

The packing (cluster/placement.py) decides which experts share a worker, not which process that
worker is: any permutation of its worker labels balances load and memory exactly as well. But
each copy that lands on a worker which does not hold it yet is a weight load there
(cluster/group_reshape.py), so the label each group of experts gets matters. `align_to` picks,
for the whole model at once (a worker is one process, so one relabelling holds for every layer),
the permutation that keeps the most (layer, expert, worker) copies in place.

What a label means after the change is fixed by the runtime: result label j < len(kept) is the
current worker kept[j] (kept workers keep their order, prepare_resize), labels from len(kept)
on are processes started for the change, holding nothing. By default kept is
0..min(W, W')-1: a rebalance keeps every worker, a scale-down drops the last ones, a scale-up
appends new ones.

Maximising the copies kept over permutations is an assignment problem, solved exactly by the
Hungarian method in O(W'^3) (no scipy here). Ties go to the lexicographically smallest
relabelling (new worker 0 the lowest label it can have, then worker 1, ...), so a placement
aligned to itself is unchanged and every node computes the same answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cluster.placement import Placement


def align_to(current: Placement, new: Placement, kept: Sequence[int] | None = None) -> Placement:
    """`new` with its workers relabelled to keep the most copies where `current` has them.

    `kept`: current's workers that stay, in their order after the change (result label j is
    current worker kept[j]); default 0..min(W, W')-1. Imbalance and per-worker memory are
    those of `new`: only the labels change.
    """
    kept = _checked_kept(current, new, kept)
    n = new.num_expert_workers
    overlap = _overlap(current, new, kept)
    # One integer cost per (new worker j, label i): the copies kept dominate (× n^n), and
    # i·n^(n-1-j) sums to less than n^n over any permutation, ordering equal-overlap ones
    # lexicographically. Python's integers keep this exact at any size.
    scale = n**n
    cost = [[-overlap[j][i] * scale + i * n ** (n - 1 - j) for i in range(n)] for j in range(n)]
    return relabel(new, _min_cost_assignment(cost))


def relabel(placement: Placement, label_of: Sequence[int]) -> Placement:
    """`placement` with worker w renamed label_of[w] (a permutation of its workers) in every layer."""
    n = placement.num_expert_workers
    if sorted(label_of) != list(range(n)):
        raise ValueError(f"label_of must be a permutation of 0..{n - 1}, got {tuple(label_of)}")
    layers = tuple(tuple(tuple(sorted(label_of[w] for w in ws)) for ws in experts)
                   for experts in placement.workers_by_layer)
    return Placement(num_experts=placement.num_experts, num_expert_workers=n, workers_by_layer=layers)


def copies_kept(current: Placement, new: Placement, kept: Sequence[int] | None = None) -> int:
    """How many of `new`'s (layer, expert, worker) copies its workers already hold (need no load)."""
    kept = _checked_kept(current, new, kept)
    overlap = _overlap(current, new, kept)
    return sum(overlap[j][j] for j in range(new.num_expert_workers))


def _overlap(current: Placement, new: Placement, kept: tuple[int, ...]) -> list[list[int]]:
    """overlap[j][i]: copies on new worker j that label i's process holds now (0 for a new process)."""
    label_of_current = {c: i for i, c in enumerate(kept)}
    overlap = [[0] * new.num_expert_workers for _ in range(new.num_expert_workers)]
    for new_experts, current_experts in zip(new.workers_by_layer, current.workers_by_layer, strict=True):
        for new_ws, current_ws in zip(new_experts, current_experts, strict=True):
            labels = [label_of_current[c] for c in current_ws if c in label_of_current]
            for j in new_ws:
                for i in labels:
                    overlap[j][i] += 1
    return overlap


def _min_cost_assignment(cost: list[list[int]]) -> tuple[int, ...]:
    """col_of[row] minimising Σ cost[row][col_of[row]] over permutations (Hungarian method, n × n).

    Shortest augmenting paths with row and column potentials (the Jonker–Volgenant form): one
    row is added per round, each round O(n^2).
    """
    n = len(cost)
    u = [0] * (n + 1)  # row potentials, 1-based; index 0 is the augmenting path's root
    v = [0] * (n + 1)  # column potentials
    row_of = [0] * (n + 1)  # row_of[col]: the row matched to col, 0 for none
    way = [0] * (n + 1)  # the previous column on the shortest path to col
    for row in range(1, n + 1):
        row_of[0] = row
        col0 = 0
        min_to = [math.inf] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[col0] = True
            row0, delta, col1 = row_of[col0], math.inf, 0
            for col in range(1, n + 1):
                if used[col]:
                    continue
                reduced = cost[row0 - 1][col - 1] - u[row0] - v[col]
                if reduced < min_to[col]:
                    min_to[col], way[col] = reduced, col0
                if min_to[col] < delta:
                    delta, col1 = min_to[col], col
            for col in range(n + 1):
                if used[col]:
                    u[row_of[col]] += delta
                    v[col] -= delta
                else:
                    min_to[col] -= delta
            col0 = col1
            if row_of[col0] == 0:
                break
        while col0:  # flip the matching along the path back to the root
            col1 = way[col0]
            row_of[col0] = row_of[col1]
            col0 = col1
    col_of = [0] * n
    for col in range(1, n + 1):
        col_of[row_of[col] - 1] = col - 1
    return tuple(col_of)


def _checked_kept(current: Placement, new: Placement, kept: Sequence[int] | None) -> tuple[int, ...]:
    if (current.num_layers, current.num_experts) != (new.num_layers, new.num_experts):
        raise ValueError(f"placements of different models: {current.num_layers}×{current.num_experts} "
                         f"vs {new.num_layers}×{new.num_experts} (layers × experts)")
    if kept is None:
        return tuple(range(min(current.num_expert_workers, new.num_expert_workers)))
    kept = tuple(kept)
    if len(set(kept)) != len(kept) or not all(0 <= c < current.num_expert_workers for c in kept):
        raise ValueError(f"kept must be distinct workers of 0..{current.num_expert_workers - 1}, got {kept}")
    if len(kept) > new.num_expert_workers:
        raise ValueError(f"{len(kept)} workers kept, the new placement has {new.num_expert_workers}")
    return kept
