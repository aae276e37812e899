"""Relabelling a new placement's workers to keep copies in place (cluster/placement_alignment.py)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.elastic_config import RebalanceConfig
from cluster.placement import Placement, place_experts
from cluster.placement_alignment import align_to, copies_kept, relabel
from cluster.rebalance_policy import (
    freed_copies,
    imbalance,
    moved_copies,
    place_for_workers,
    propose_rebalance,
)


def copies(p: Placement) -> set[tuple[int, int, int]]:
    return {(layer, e, w) for layer in range(p.num_layers) for e in range(p.num_experts)
            for w in p.workers_of(layer, e)}


def copies_per_worker(p: Placement) -> list[int]:
    return sorted(p.num_copies_on(w) for w in range(p.num_expert_workers))


def draw_placement(data: st.DataObject, num_layers: int, num_experts: int, num_workers: int) -> Placement:
    """Any expert on any nonempty set of workers: alignment needs no balance to be right."""
    holders = st.sets(st.integers(0, num_workers - 1), min_size=1).map(lambda ws: tuple(sorted(ws)))
    layers = tuple(tuple(data.draw(holders) for _ in range(num_experts)) for _ in range(num_layers))
    return Placement(num_experts=num_experts, num_expert_workers=num_workers, workers_by_layer=layers)


def brute_force(current: Placement, new: Placement, kept=None) -> tuple[int, Placement]:
    """The most copies kept over every relabelling, and the lexicographically first relabelling with it."""
    n = new.num_expert_workers
    best = min(itertools.permutations(range(n)),
               key=lambda perm: (-copies_kept(current, relabel(new, perm), kept), perm))
    aligned = relabel(new, best)
    return copies_kept(current, aligned, kept), aligned


sizes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5))


@settings(max_examples=200, deadline=None)
@given(sizes=sizes, data=st.data())
def test_a_relabelling_keeps_imbalance_and_memory(sizes, data):
    num_layers, num_experts, num_workers, _ = sizes
    p = draw_placement(data, num_layers, num_experts, num_workers)
    perm = data.draw(st.permutations(range(num_workers)))
    q = relabel(p, perm)
    keys = [(layer, e) for layer in range(num_layers) for e in range(num_experts)]
    load = data.draw(st.dictionaries(st.sampled_from(keys), st.integers(0, 1000).map(float)))
    assert imbalance(q, load) == pytest.approx(imbalance(p, load), rel=1e-12)
    assert copies_per_worker(q) == copies_per_worker(p)
    for layer in range(num_layers):
        assert sorted(q.worker_loads(layer, load)) == pytest.approx(sorted(p.worker_loads(layer, load)))
        assert q.experts_on(layer, perm[0]) == p.experts_on(layer, 0)  # worker 0's experts, renamed
    assert relabel(q, [perm.index(w) for w in range(num_workers)]) == p  # the inverse undoes it


@settings(max_examples=200, deadline=None)
@given(sizes=sizes, data=st.data())
def test_the_alignment_keeps_the_most_copies_and_the_first_relabelling_among_ties(sizes, data):
    num_layers, num_experts, num_workers, new_workers = sizes  # new_workers != num_workers: a resize
    current = draw_placement(data, num_layers, num_experts, num_workers)
    new = draw_placement(data, num_layers, num_experts, new_workers)
    aligned = align_to(current, new)
    best, first = brute_force(current, new)
    assert copies_kept(current, aligned) == best >= copies_kept(current, new)
    assert aligned == first  # ties: the lowest labels
    assert copies_per_worker(aligned) == copies_per_worker(new)
    # Copies kept are exactly those moved_copies does not list (a label below min(W, W') is the same process).
    assert len(copies(aligned)) - copies_kept(current, aligned) == len(moved_copies(current, aligned))
    assert len(moved_copies(current, aligned)) <= len(moved_copies(current, new))


@settings(max_examples=150, deadline=None)
@given(sizes=sizes, data=st.data())
def test_explicit_kept_workers_are_matched_by_their_new_labels(sizes, data):
    num_layers, num_experts, num_workers, new_workers = sizes
    current = draw_placement(data, num_layers, num_experts, num_workers)
    new = draw_placement(data, num_layers, num_experts, new_workers)
    kept = data.draw(st.permutations(range(num_workers)))[:min(num_workers, new_workers)]
    kept = tuple(sorted(kept))  # e.g. a repair that dropped a worker in the middle
    aligned = align_to(current, new, kept)
    assert (copies_kept(current, aligned, kept), aligned) == brute_force(current, new, kept)
    # Label j is current worker kept[j]: the copies kept are those kept[j] holds and label j gets.
    held = {(layer, e, j) for layer, e, w in copies(current) if w in kept for j in [kept.index(w)]}
    assert copies_kept(current, aligned, kept) == len(held & copies(aligned))


@settings(max_examples=150, deadline=None)
@given(sizes=sizes, data=st.data())
def test_aligning_a_placement_to_itself_changes_nothing(sizes, data):
    num_layers, num_experts, num_workers, _ = sizes
    p = draw_placement(data, num_layers, num_experts, num_workers)
    assert align_to(p, p) == p
    balanced = place_experts(num_layers, num_experts, num_workers,
                             load={(layer, e): float(e * e + layer) for layer in range(num_layers)
                                   for e in range(num_experts)})
    assert align_to(balanced, balanced) == balanced


def test_adding_a_replica_no_longer_moves_the_other_expert():
    # The example from test_rebalance_policy: the packing alone moved expert 1 from worker 1 to 0.
    current = place_experts(1, 2, 2)  # expert 0 on worker 0, expert 1 on worker 1
    packed = place_experts(1, 2, 2, replicas={(0, 0): 2, (0, 1): 1}, load={(0, 0): 100.0, (0, 1): 0.0})
    assert packed.workers_by_layer == (((0, 1), (0,)),)
    assert moved_copies(current, packed) == ((0, 0, 1), (0, 1, 0))
    aligned = align_to(current, packed)
    assert aligned.workers_by_layer == (((0, 1), (1,)),)
    assert moved_copies(current, aligned) == ((0, 0, 1),)  # only the new replica loads
    assert freed_copies(current, aligned) == ()
    proposal = propose_rebalance(current, {(0, 0): 100.0},
                                 RebalanceConfig(min_tokens=0, extra_copies_per_layer=1))
    assert proposal is not None and proposal.placement == aligned


def test_a_scale_up_keeps_every_worker_that_can_keep_its_experts():
    current = place_experts(1, 8, 4)  # 0,1 | 2,3 | 4,5 | 6,7
    grown = place_experts(1, 8, 5)  # 0,1 | 2,3 | 4,5 | 6 | 7
    assert align_to(current, grown) == grown  # expert 6 stays on worker 3, 7 goes to the new one
    assert place_for_workers(current, 5, None) == grown
    scrambled = relabel(grown, (4, 3, 2, 1, 0))  # worker 0 holds expert 7, worker 1 expert 6
    aligned = align_to(current, scrambled)
    # Experts 0..5 stay; of 6 and 7 (a tie) scrambled worker 0 takes the lower label, 3.
    assert [aligned.experts_on(0, w) for w in range(5)] == [(0, 1), (2, 3), (4, 5), (7,), (6,)]
    assert moved_copies(current, aligned) == ((0, 6, 4),)  # the one copy the new worker must load


def test_a_scale_down_drops_the_last_workers_and_keeps_the_rest_in_place():
    current = place_experts(1, 6, 3)  # 0,1 | 2,3 | 4,5; worker 2 leaves
    shrunk = Placement(num_experts=6, num_expert_workers=2,
                       workers_by_layer=(((1,), (1,), (0,), (0,), (0,), (1,)),))
    aligned = align_to(current, shrunk)
    assert aligned.workers_by_layer == (((0,), (0,), (1,), (1,), (1,), (0,)),)
    assert moved_copies(current, aligned) == ((0, 4, 1), (0, 5, 0))  # only worker 2's experts load
    # A repair that lost worker 0 instead keeps workers 1 (2, 3) and 2 (4, 5) as labels 0 and 1:
    # shrunk's worker 0 (2, 3, 4) is best as label 0, keeping 2 and 3; its worker 1 keeps 5.
    repaired = align_to(current, shrunk, kept=(1, 2))
    assert repaired == shrunk
    assert copies_kept(current, repaired, kept=(1, 2)) == 3
    assert copies_kept(current, relabel(shrunk, (1, 0)), kept=(1, 2)) == 1


@settings(max_examples=100, deadline=None)
@given(num_layers=st.integers(1, 3), num_workers=st.integers(2, 5), new_workers=st.integers(1, 6),
       extra=st.integers(0, 3), data=st.data())
def test_resizes_and_rebalances_move_no_more_than_the_packing_alone(num_layers, num_workers, new_workers,
                                                                    extra, data):
    num_experts = 8
    keys = [(layer, e) for layer in range(num_layers) for e in range(num_experts)]
    load = data.draw(st.dictionaries(st.sampled_from(keys), st.integers(1, 1000).map(float), min_size=1))
    current = place_experts(num_layers, num_experts, num_workers)
    full = {k: load.get(k, 0.0) for k in keys}
    packed = place_experts(num_layers, num_experts, new_workers, load=full)
    resized = place_for_workers(current, new_workers, load)
    assert resized == align_to(current, packed)
    assert len(moved_copies(current, resized)) <= len(moved_copies(current, packed))
    proposal = propose_rebalance(current, load, RebalanceConfig(threshold=1.0, min_gain=0.0, min_tokens=0,
                                                                extra_copies_per_layer=extra))
    if proposal is not None:  # already aligned: no relabelling keeps more
        assert copies_kept(current, proposal.placement) == brute_force(current, proposal.placement)[0]


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="different models"):
        align_to(place_experts(1, 4, 2), place_experts(2, 4, 2))
    with pytest.raises(ValueError, match="distinct workers"):
        align_to(place_experts(1, 4, 3), place_experts(1, 4, 2), kept=(0, 0))
    with pytest.raises(ValueError, match="distinct workers"):
        align_to(place_experts(1, 4, 3), place_experts(1, 4, 2), kept=(3,))
    with pytest.raises(ValueError, match="3 workers kept"):
        align_to(place_experts(1, 4, 3), place_experts(1, 4, 2), kept=(0, 1, 2))
    with pytest.raises(ValueError, match="permutation"):
        relabel(place_experts(1, 4, 2), (0, 0))
