"""The rebalance policy: imbalance, when a move pays, what it moves, and the pool-resize placement."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.elastic_config import RebalanceConfig
from cluster.placement import Placement, place_experts, replicate_hot_experts
from cluster.placement_alignment import align_to, copies_kept
from cluster.rebalance_policy import (
    Proposal,
    cheapest_to_drop,
    freed_copies,
    imbalance,
    moved_copies,
    place_for_workers,
    propose_rebalance,
)

EAGER = RebalanceConfig(threshold=1.0, min_gain=0.0, min_tokens=0)


def assert_valid(p: Placement, num_layers: int, num_experts: int, num_workers: int) -> None:
    assert (p.num_layers, p.num_experts, p.num_expert_workers) == (num_layers, num_experts, num_workers)
    for layer in range(num_layers):
        copies = 0
        for e in range(num_experts):
            ws = p.workers_of(layer, e)
            assert len(ws) >= 1 and len(set(ws)) == len(ws)  # somewhere, replicas on distinct workers
            assert all(0 <= w < num_workers for w in ws)
            copies += len(ws)
        per_worker = [len(p.experts_on(layer, w)) for w in range(num_workers)]
        assert max(per_worker) <= math.ceil(copies / num_workers)  # memory stays even


def test_imbalance_is_the_slowdown_against_a_perfect_spread():
    p = place_experts(2, 4, 2)  # both layers: worker 0 holds experts 0, 1; worker 1 holds 2, 3
    load = {(0, 0): 30, (0, 1): 10, (0, 2): 10, (0, 3): 10, (1, 2): 20}
    # Layer 0: workers 40 / 20, busiest 40, mean 30. Layer 1: 0 / 20, busiest 20, mean 10.
    assert imbalance(p, load) == (40 + 20) / (30 + 10)
    assert imbalance(p, {}) == 1.0
    assert imbalance(p, {(0, 0): 0.0}) == 1.0
    replicated = place_experts(1, 2, 2, replicas={(0, 0): 2})
    assert imbalance(replicated, {(0, 0): 10.0, (0, 1): 10.0}) == 15.0 / 10.0  # a replica's load is split


def test_a_skewed_layer_is_rebalanced_and_the_moves_are_listed():
    current = place_experts(1, 4, 2)
    load = {(0, 0): 100, (0, 1): 100}
    proposal = propose_rebalance(current, load, RebalanceConfig(min_tokens=100))
    assert proposal == Proposal(placement=place_experts(1, 4, 2, load=load), imbalance_before=2.0,
                                imbalance_after=1.0)
    assert [proposal.placement.experts_on(0, w) for w in range(2)] == [(0, 2), (1, 3)]
    assert moved_copies(current, proposal.placement) == ((0, 1, 1), (0, 2, 0))
    assert freed_copies(current, proposal.placement) == ((0, 1, 0), (0, 2, 1))


def test_no_move_when_it_would_not_pay():
    current = place_experts(1, 4, 2)
    load = {(0, 0): 100, (0, 1): 100}
    assert propose_rebalance(current, load, RebalanceConfig(min_tokens=201)) is None  # too few tokens
    assert propose_rebalance(current, load, RebalanceConfig(threshold=2.01, min_tokens=0)) is None
    # From 2.0 to 1.0 is a 50 % cut: enough for min_gain 0.5 only if strictly below 2.0 · 0.5.
    assert propose_rebalance(current, load, RebalanceConfig(min_gain=0.5, min_tokens=0)) is None
    assert propose_rebalance(current, load, RebalanceConfig(min_gain=0.49, min_tokens=0)) is not None
    # Already balanced: nothing to gain.
    assert propose_rebalance(current, {(0, 0): 50, (0, 2): 50}, EAGER) is None


def test_one_hot_expert_needs_a_replica():
    current = place_experts(1, 2, 2)
    load = {(0, 0): 100.0}
    assert propose_rebalance(current, load, RebalanceConfig(min_tokens=0)) is None  # moving alone cannot help
    proposal = propose_rebalance(current, load, RebalanceConfig(min_tokens=0, extra_copies_per_layer=1))
    assert proposal is not None
    assert proposal.placement.workers_of(0, 0) == (0, 1)
    assert (proposal.imbalance_before, proposal.imbalance_after) == (2.0, 1.0)
    # Aligned to the current placement: only the new replica loads, expert 1 stays on worker 1
    # (the packing alone put it on worker 0, a needless move).
    assert moved_copies(current, proposal.placement) == ((0, 0, 1),)
    assert freed_copies(current, proposal.placement) == ()
    # More extra copies than fit (2 experts × 1 spare worker) are clamped, not refused.
    many = propose_rebalance(current, load, RebalanceConfig(min_tokens=0, extra_copies_per_layer=9))
    assert many is not None and many.placement.workers_by_layer == (((0, 1), (0, 1)),)


def test_load_outside_the_placement_is_refused():
    with pytest.raises(ValueError, match="outside"):
        propose_rebalance(place_experts(1, 4, 2), {(1, 0): 5.0}, EAGER)
    with pytest.raises(ValueError, match="finite"):
        place_for_workers(place_experts(1, 4, 2), 3, {(0, 0): -1.0})
    with pytest.raises(ValueError, match="different models"):
        moved_copies(place_experts(1, 4, 2), place_experts(2, 4, 2))


def test_place_for_workers_grows_and_shrinks_the_pool():
    current = place_experts(2, 8, 4)
    # The new placement's workers are relabelled to keep what the kept workers hold.
    assert place_for_workers(current, 5, None) == align_to(current, place_experts(2, 8, 5))
    assert place_for_workers(current, 3, {}) == align_to(current, place_experts(2, 8, 3))  # no tokens
    load = {(0, 0): 70.0, (0, 1): 60.0, (1, 7): 5.0}
    grown = place_for_workers(current, 5, load)
    assert grown == align_to(current, place_experts(2, 8, 5, load={(layer, e): load.get((layer, e), 0.0)
                                                                   for layer in range(2) for e in range(8)}))
    assert_valid(grown, 2, 8, 5)
    assert all(len(grown.workers_of(layer, e)) == 1 for layer in range(2) for e in range(8))
    assert grown.workers_of(0, 0) != grown.workers_of(0, 1)
    shrunk = place_for_workers(current, 2, load, extra_copies_per_layer=1)
    assert_valid(shrunk, 2, 8, 2)
    assert shrunk.workers_of(0, 0) == (0, 1)  # the hottest expert got the extra copy
    # Moves to a bigger pool: every copy on the new worker must be loaded.
    assert {w for _, _, w in moved_copies(current, grown)} >= {4}


keys_strategy = st.integers(1, 3).flatmap(lambda num_layers: st.tuples(
    st.just(num_layers), st.integers(1, 10), st.integers(1, 5)))


def draw_load(data: st.DataObject, num_layers: int, num_experts: int) -> dict[tuple[int, int], float]:
    keys = [(layer, e) for layer in range(num_layers) for e in range(num_experts)]
    return data.draw(st.dictionaries(st.sampled_from(keys), st.integers(0, 1000).map(float)))


def draw_current(data: st.DataObject, num_layers: int, num_experts: int, num_workers: int) -> Placement:
    """The contiguous default or an earlier balanced placement, maybe with replicas."""
    if data.draw(st.booleans()):
        return place_experts(num_layers, num_experts, num_workers)
    earlier = {(layer, e): float(max(layer, e) % 3)
               for layer in range(num_layers) for e in range(num_experts)}
    extra = data.draw(st.integers(0, num_experts * (num_workers - 1)))
    return place_experts(num_layers, num_experts, num_workers, load=earlier,
                         replicas=replicate_hot_experts(earlier, num_workers, extra))


configs = st.builds(RebalanceConfig, threshold=st.floats(1.0, 2.5), min_gain=st.floats(0.0, 0.5),
                    extra_copies_per_layer=st.integers(0, 6), min_tokens=st.integers(0, 3000))


@settings(max_examples=200, deadline=None)
@given(sizes=keys_strategy, cfg=configs, data=st.data())
def test_a_proposal_is_made_exactly_when_it_pays(sizes, cfg, data):
    num_layers, num_experts, num_workers = sizes
    current = draw_current(data, num_layers, num_experts, num_workers)
    load = draw_load(data, num_layers, num_experts)
    proposal = propose_rebalance(current, load, cfg)

    # The candidate, built straight from the recipe, its workers aligned to the current ones.
    full = {(layer, e): load.get((layer, e), 0.0) for layer in range(num_layers) for e in range(num_experts)}
    extra = min(cfg.extra_copies_per_layer, num_experts * (num_workers - 1))
    replicas = replicate_hot_experts(full, num_workers, extra) if extra else None
    candidate = align_to(current, place_experts(num_layers, num_experts, num_workers, replicas=replicas,
                                                load=full))
    before, after = imbalance(current, load), imbalance(candidate, load)
    pays = (sum(load.values()) >= cfg.min_tokens and before >= cfg.threshold
            and after < before * (1 - cfg.min_gain))
    assert (proposal is not None) == pays
    if proposal is not None:
        assert proposal.placement == candidate
        assert proposal.imbalance_before == before
        assert proposal.imbalance_after == imbalance(proposal.placement, load)
        assert proposal.imbalance_after < proposal.imbalance_before
        assert_valid(proposal.placement, num_layers, num_experts, num_workers)
        assert propose_rebalance(current, dict(reversed(list(load.items()))), cfg) == proposal


@settings(max_examples=150, deadline=None)
@given(num_layers=st.integers(1, 3), num_workers=st.integers(2, 5), per_worker=st.integers(2, 4),
       hot=st.integers(1, 1000))
def test_a_skewed_load_is_improved(num_layers, num_workers, per_worker, hot):
    # All of each layer's tokens land on the experts worker 0 holds: the worst case of the default.
    current = place_experts(num_layers, num_workers * per_worker, num_workers)
    load = {(layer, e): float(hot) for layer in range(num_layers) for e in current.experts_on(layer, 0)}
    proposal = propose_rebalance(current, load, RebalanceConfig(threshold=1.5, min_gain=0.1, min_tokens=0))
    assert proposal is not None
    assert proposal.imbalance_before == pytest.approx(num_workers)
    assert proposal.imbalance_after <= 0.9 * proposal.imbalance_before


@settings(max_examples=150, deadline=None)
@given(sizes=keys_strategy, new_workers=st.integers(1, 6), extra=st.integers(0, 4),
       with_load=st.booleans(), data=st.data())
def test_resized_placements_are_valid_and_the_moves_add_up(sizes, new_workers, extra, with_load, data):
    num_layers, num_experts, num_workers = sizes
    current = draw_current(data, num_layers, num_experts, num_workers)
    load = draw_load(data, num_layers, num_experts) if with_load else None
    new = place_for_workers(current, new_workers, load, extra_copies_per_layer=extra)
    assert_valid(new, num_layers, num_experts, new_workers)
    if load is None or extra == 0:
        assert all(len(ws) == 1 for experts in new.workers_by_layer for ws in experts)

    def copies(p: Placement) -> set[tuple[int, int, int]]:
        return {(layer, e, w) for layer in range(p.num_layers) for e in range(p.num_experts)
                for w in p.workers_of(layer, e)}

    moved, freed = moved_copies(current, new), freed_copies(current, new)
    assert (copies(current) - set(freed)) | set(moved) == copies(new)
    assert not set(moved) & copies(current) and not set(freed) & copies(new)
    assert list(moved) == sorted(moved) and list(freed) == sorted(freed)


def test_a_scale_down_drops_the_worker_whose_experts_are_cheapest_to_take_over():
    # Worker 0 holds one replica copy only; dropping it moves nothing, dropping the last worker would.
    current = Placement(num_experts=4, num_expert_workers=3, workers_by_layer=(
        ((0, 1), (1,), (2,), (2,)),))
    placement, dropped = cheapest_to_drop(current, 2, None)
    kept = [w for w in range(3) if w not in dropped]
    default = place_for_workers(current, 2, None)  # the last worker dropped
    assert copies_kept(current, placement, kept) >= copies_kept(current, default)
    assert dropped == (0,) and copies_kept(current, placement, kept) == 4  # nothing to load
    for e in range(4):
        assert placement.workers_of(0, e)


@settings(max_examples=100, deadline=None)
@given(workers=st.integers(2, 5), experts=st.integers(2, 8), layers=st.integers(1, 3), data=st.data())
def test_cheapest_to_drop_never_loads_more_than_dropping_the_last(workers, experts, layers, data):
    load = {(layer, e): float(data.draw(st.integers(0, 50)))
            for layer in range(layers) for e in range(experts)}
    current = place_for_workers(place_experts(layers, experts, workers), workers, load)
    n = data.draw(st.integers(1, workers - 1))
    placement, dropped = cheapest_to_drop(current, n, load)
    kept = [w for w in range(workers) if w not in dropped]
    assert len(dropped) == workers - n and placement.num_expert_workers == n
    assert imbalance(placement, load) == pytest.approx(imbalance(place_for_workers(current, n, load), load))
    assert copies_kept(current, placement, kept) >= copies_kept(current, place_for_workers(current, n, load))
