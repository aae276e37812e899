"""The placement a repair uses when one expert worker is lost (cluster/placement_shrink.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.placement import place_experts
from cluster.placement_shrink import without_worker


def test_the_lost_workers_experts_go_to_the_survivors_and_nothing_else_moves():
    p = place_experts(num_layers=2, num_experts=8, num_expert_workers=3)  # 3/3/2, rotating
    q = without_worker(p, 1)
    assert q.num_expert_workers == 2
    for layer in range(2):
        # Worker 0 keeps its experts; old worker 2 is now worker 1 and keeps its own.
        assert set(p.experts_on(layer, 0)) <= set(q.experts_on(layer, 0))
        assert set(p.experts_on(layer, 2)) <= set(q.experts_on(layer, 1))
        assert sorted(q.experts_on(layer, 0) + q.experts_on(layer, 1)) == list(range(8))


def test_a_replicated_expert_keeps_its_other_copy_and_gains_none():
    p = place_experts(1, 4, 3, replicas={(0, 0): 2})
    lost = p.workers_of(0, 0)[0]
    q = without_worker(p, lost)
    assert len(q.workers_of(0, 0)) == 1  # the surviving copy takes its tokens


def test_the_only_worker_cannot_be_removed():
    with pytest.raises(ValueError, match="no survivor"):
        without_worker(place_experts(1, 4, 1), 0)
    with pytest.raises(ValueError, match="outside"):
        without_worker(place_experts(1, 4, 2), 2)


@settings(max_examples=150, deadline=None)
@given(layers=st.integers(1, 4), experts=st.integers(1, 10), workers=st.integers(2, 5), data=st.data())
def test_every_expert_stays_somewhere_on_distinct_survivors(layers, experts, workers, data):
    replicas = {}
    for layer in range(layers):
        for e in range(experts):
            n = data.draw(st.integers(1, workers))
            if n > 1:
                replicas[(layer, e)] = n
    p = place_experts(layers, experts, workers, replicas=replicas or None)
    lost = data.draw(st.integers(0, workers - 1))
    q = without_worker(p, lost)
    for layer in range(layers):
        for e in range(experts):
            ws = q.workers_of(layer, e)
            assert ws and len(set(ws)) == len(ws) and all(0 <= w < workers - 1 for w in ws)
            # Every surviving copy stays where it was (indices past the lost worker shift down).
            kept = tuple(w - (w > lost) for w in p.workers_of(layer, e) if w != lost)
            assert set(kept) <= set(ws) and len(ws) == max(len(kept), 1)
    q.to_expert_map(1)  # a valid expert map (every expert on some rank)
