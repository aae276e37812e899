"""Expert placement: a pure function, checked on small inputs and random ones."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.placement import Placement, place_experts, replicate_hot_experts
from workers.moe.expert_map import ExpertMap


def copies_per_worker(p: Placement, layer: int) -> list[int]:
    return [len(p.experts_on(layer, w)) for w in range(p.num_expert_workers)]


def test_every_expert_on_one_worker_without_load():
    p = place_experts(num_layers=2, num_experts=8, num_expert_workers=4)
    for layer in range(2):
        assert [p.experts_on(layer, w) for w in range(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
        assert all(len(p.workers_of(layer, e)) == 1 for e in range(8))


def test_uneven_split_is_contiguous_and_rotates_over_layers():
    p = place_experts(num_layers=3, num_experts=8, num_expert_workers=3)
    assert [p.experts_on(0, w) for w in range(3)] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert sorted(copies_per_worker(p, 1)) == [2, 3, 3]
    assert copies_per_worker(p, 0) != copies_per_worker(p, 1)
    # Over 3 layers every worker holds 8 copies: memory is balanced, not just each layer.
    assert [p.num_copies_on(w) for w in range(3)] == [8, 8, 8]


def test_more_workers_than_experts_leaves_some_idle():
    p = place_experts(num_layers=1, num_experts=3, num_expert_workers=5)
    assert sorted(copies_per_worker(p, 0)) == [0, 0, 1, 1, 1]


def test_replicas_sit_on_distinct_workers():
    replicas = {(0, 0): 3, (0, 5): 2, (1, 7): 4}
    p = place_experts(2, 8, 4, replicas=replicas)
    for (layer, e), n in replicas.items():
        ws = p.workers_of(layer, e)
        assert len(ws) == n and len(set(ws)) == n
    # 11 copies on 4 workers in layer 0: 3/3/3/2.
    assert sorted(copies_per_worker(p, 0)) == [2, 3, 3, 3]


def test_load_balancing_improves_max_over_mean():
    rng = random.Random(0)
    load = {(0, e): float(rng.paretovariate(1.2) * 100) for e in range(16)}
    naive = place_experts(1, 16, 4)
    balanced = place_experts(1, 16, 4, load=load)
    hot = replicate_hot_experts(load, 4, num_extra_slots=4)
    replicated = place_experts(1, 16, 4, replicas=hot, load=load)

    def imbalance(p: Placement) -> float:
        w = p.worker_loads(0, load)
        return max(w) / (sum(w) / len(w))

    assert imbalance(balanced) < imbalance(naive)
    assert imbalance(replicated) <= imbalance(balanced)
    assert imbalance(replicated) < 1.2
    assert sum(balanced.worker_loads(0, load)) == pytest.approx(sum(load.values()))
    assert copies_per_worker(balanced, 0) == [4, 4, 4, 4]  # balancing load keeps memory even
    assert sorted(copies_per_worker(replicated, 0)) == [5, 5, 5, 5]


def test_heaviest_expert_alone_when_it_dominates():
    load = {(0, 0): 1000.0} | {(0, e): 1.0 for e in range(1, 6)}
    p = place_experts(1, 6, 3, load=load)
    (w,) = p.workers_of(0, 0)
    assert p.worker_loads(0, load)[w] == max(p.worker_loads(0, load))
    assert len(p.experts_on(0, w)) == 2  # the memory cap still gives it a neighbour


def test_room_is_kept_for_an_expert_with_many_copies():
    # Least-loaded-first alone would fill worker 1 with experts 1, 0, 4 and leave expert 3's
    # second copy nowhere to go but onto a full worker.
    load = {(0, e): w for e, w in enumerate([3.0, 5.0, 9.0, 0.0, 1.0])}
    p = place_experts(1, 5, 2, replicas={(0, 3): 2}, load=load)
    assert p.workers_of(0, 3) == (0, 1)
    assert copies_per_worker(p, 0) == [3, 3]


def test_deterministic():
    load = {(layer, e): float((7 * e + layer) % 5) for layer in range(3) for e in range(8)}
    replicas = {(1, 2): 2, (2, 0): 3}
    a = place_experts(3, 8, 3, replicas=replicas, load=load)
    b = place_experts(3, 8, 3, replicas=dict(reversed(list(replicas.items()))),
                      load=dict(reversed(list(load.items()))))
    assert a == b


@settings(max_examples=150, deadline=None)
@given(num_layers=st.integers(1, 3), num_experts=st.integers(1, 12), num_workers=st.integers(1, 6),
       data=st.data())
def test_every_expert_placed_with_its_copies(num_layers, num_experts, num_workers, data):
    keys = [(layer, e) for layer in range(num_layers) for e in range(num_experts)]
    replicas = data.draw(st.dictionaries(st.sampled_from(keys), st.integers(1, num_workers), max_size=6))
    load = data.draw(st.none() | st.dictionaries(st.sampled_from(keys), st.floats(0, 1e4)))
    p = place_experts(num_layers, num_experts, num_workers, replicas=replicas, load=load)
    for layer in range(num_layers):
        total = 0
        for e in range(num_experts):
            ws = p.workers_of(layer, e)
            assert len(ws) == replicas.get((layer, e), 1) == len(set(ws))
            assert all(0 <= w < num_workers for w in ws)
            total += len(ws)
        assert sum(copies_per_worker(p, layer)) == total
        assert max(copies_per_worker(p, layer)) <= math.ceil(total / num_workers)  # memory stays even
    p.to_expert_map(first_expert_rank=2)  # validates itself


def test_to_expert_map_puts_expert_ranks_after_attention_ranks():
    p = place_experts(2, 8, 3)
    m = p.to_expert_map(first_expert_rank=2)
    assert m.world_size == 5 and m.expert_ranks == (2, 3, 4) and m.attention_ranks == (0, 1)
    assert m.num_layers == 2 and m.num_experts == 8
    assert m.local_experts(0, 0) == () and m.local_experts(0, 2) == (0, 1, 2)
    assert m.replicas(0, 7) == ((4, 1),)  # expert 7 is the second expert on worker 2 (rank 4)
    assert m == p.to_expert_map(first_expert_rank=2)


def test_expert_map_lists_every_copy_with_its_slot():
    m = place_experts(2, 8, 3, replicas={(1, 4): 2}).to_expert_map(first_expert_rank=2)
    copies = m.replicas(1, 4)
    assert len(copies) == 2 and len({rank for rank, _ in copies}) == 2
    for rank, slot in copies:
        assert m.local_experts(1, rank)[slot] == 4
    assert m.max_local_experts(1) == 3


def test_expert_map_rejects_inconsistent_tables():
    with pytest.raises(ValueError, match="on no rank"):
        ExpertMap(world_size=2, num_experts=3, expert_ranks=(1,), local_expert_ids=(((), (0, 1)),))
    with pytest.raises(ValueError, match="not an expert rank"):
        ExpertMap(world_size=2, num_experts=2, expert_ranks=(1,), local_expert_ids=(((0,), (1,)),))
    with pytest.raises(ValueError, match="ascending"):
        ExpertMap(world_size=1, num_experts=2, expert_ranks=(0,), local_expert_ids=(((1, 0),),))


def test_replicate_hot_experts_gives_extra_copies_to_the_hottest():
    load = {(0, 0): 10.0, (0, 1): 100.0, (0, 2): 30.0, (1, 0): 5.0, (1, 1): 5.0}
    copies = replicate_hot_experts(load, num_expert_workers=4, num_extra_slots=3)
    # Layer 0: 100 → 2 copies (50 each) → 3 copies (33.3) → then 30 vs 33.3: expert 1 again.
    assert copies[(0, 1)] == 4 and copies[(0, 0)] == 1 and copies[(0, 2)] == 1
    # Layer 1: a tie goes to the lower id first, then alternates.
    assert copies[(1, 0)] == 3 and copies[(1, 1)] == 2
    assert replicate_hot_experts(load, 4, 0) == {key: 1 for key in load}


def test_replicate_hot_experts_never_exceeds_one_copy_per_worker():
    load = {(0, 0): 1000.0, (0, 1): 1.0}
    assert replicate_hot_experts(load, 2, 2) == {(0, 0): 2, (0, 1): 2}
    with pytest.raises(ValueError, match="do not fit"):
        replicate_hot_experts(load, 2, 3)


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((2, 8, 0), {}, "at least one expert worker"),
    ((0, 8, 2), {}, "at least one layer"),
    ((2, 0, 2), {}, "at least one expert"),
    ((2, 8, 2), {"replicas": {(0, 1): 3}}, "one per worker"),
    ((2, 8, 2), {"replicas": {(0, 1): 0}}, "copies must be"),
    ((2, 8, 2), {"replicas": {(2, 1): 2}}, "outside"),
    ((2, 8, 2), {"load": {(0, 8): 1.0}}, "outside"),
    ((2, 8, 2), {"load": {(0, 1): -1.0}}, "finite"),
    ((2, 8, 2), {"load": {(0, 1): float("nan")}}, "finite"),
])
def test_bad_inputs_are_refused(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        place_experts(*args, **kwargs)


def test_bad_replication_inputs_are_refused():
    with pytest.raises(ValueError, match="at least one expert worker"):
        replicate_hot_experts({(0, 0): 1.0}, 0, 0)
    with pytest.raises(ValueError, match=">= 0"):
        replicate_hot_experts({(0, 0): 1.0}, 2, -1)
    with pytest.raises(ValueError, match=">= 0"):
        place_experts(1, 2, 2).to_expert_map(first_expert_rank=-1)
