"""Capacity factor: dropless by default, drops counted, dropped assignments add nothing."""

from __future__ import annotations

import pytest
import torch

from cluster.placement import place_experts
from workers.comm.transport import LocalTransport
from workers.moe.a2a_dispatcher import AllToAllDispatcher
from workers.moe.block import experts_stage, moe_block
from workers.moe.capacity import expert_capacity, keep_within_capacity, position_in_expert
from workers.moe.dispatcher import LocalDispatcher
from workers.moe.experts import LayerExperts, reference_experts
from workers.moe.route import route

HIDDEN, INTER, NUM_EXPERTS = 12, 20, 6


class _Expert:
    def __init__(self, g: torch.Generator) -> None:
        self.w1 = torch.randn(INTER, HIDDEN, generator=g) * 0.3
        self.w2 = torch.randn(HIDDEN, INTER, generator=g) * 0.3
        self.w3 = torch.randn(INTER, HIDDEN, generator=g) * 0.3


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    experts = LayerExperts.stack({e: _Expert(g) for e in range(NUM_EXPERTS)})
    gate = torch.randn(NUM_EXPERTS, HIDDEN, generator=g)
    gate[2] += 3.0  # a hot expert, so a tight capacity has something to drop
    x = torch.randn(40, HIDDEN, generator=g) + 0.5
    return experts, gate, x


def dispatcher_with(capacity_factor: float | None) -> AllToAllDispatcher:
    expert_map = place_experts(1, NUM_EXPERTS, 1).to_expert_map(first_expert_rank=0)
    return AllToAllDispatcher(0, expert_map, LocalTransport(), capacity_factor=capacity_factor)


def run(dispatcher, experts, x, gate, top_k=2):
    routing = route(x, gate, top_k)
    x_M, plan = dispatcher.dispatch(0, x, routing)
    return dispatcher.combine(0, experts_stage(x_M, plan, experts), plan), plan, routing


def test_capacity_formula():
    assert expert_capacity(num_tokens=8, top_k=2, num_experts=8, capacity_factor=1.0) == 2
    assert expert_capacity(8, 2, 8, 1.25) == 3  # 2.5 rounds up
    assert expert_capacity(10, 2, 2, 1.1) == 11  # not 12: 1.1 × 10 is 11.000000000000002 in floats
    assert expert_capacity(0, 2, 8, 1.0) == 0
    with pytest.raises(ValueError, match="> 0"):
        expert_capacity(8, 2, 8, 0.0)


def test_position_in_expert_counts_earlier_assignments():
    ids = torch.tensor([3, 1, 3, 3, 0, 1])
    assert position_in_expert(ids, 4).tolist() == [0, 0, 1, 2, 0, 1]
    assert position_in_expert(torch.empty(0, dtype=torch.long), 4).numel() == 0


def test_later_tokens_are_dropped_first():
    topk_ids = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0]])
    keep = keep_within_capacity(topk_ids, num_experts=4, capacity_factor=1.0)  # capacity 2
    assert keep.tolist() == [[True, True], [True, True], [False, True], [True, False]]


def test_dropless_by_default_is_exact(layer):
    experts, gate, x = layer
    got, plan, _ = run(dispatcher_with(None), experts, x, gate)
    assert plan.num_dropped == 0
    want = moe_block(0, x, gate, 2, LocalDispatcher(len(experts.expert_ids)), experts)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_drops_are_counted_and_add_zero(layer):
    experts, gate, x = layer
    dispatcher = dispatcher_with(0.5)
    got, plan, routing = run(dispatcher, experts, x, gate)
    keep = keep_within_capacity(routing.topk_ids_TK, NUM_EXPERTS, 0.5)
    assert plan.num_dropped == int((~keep).sum()) > 0
    assert plan.num_sent == int(keep.sum())  # dropped assignments are not sent at all
    cap = expert_capacity(40, 2, NUM_EXPERTS, 0.5)
    assert max(plan.recv_expert_counts) == cap
    # The oracle: the per-expert loop with every dropped assignment's weight zeroed.
    want = reference_experts(x, routing.topk_ids_TK, routing.topk_weights_TK * keep, experts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert dispatcher.stats.snapshot_and_reset().num_dropped == plan.num_dropped


def test_large_capacity_is_dropless(layer):
    experts, gate, x = layer
    exact, _, _ = run(dispatcher_with(None), experts, x, gate)
    # A factor of E/K lets every token through even if all of them pick the same expert.
    got, plan, _ = run(dispatcher_with(NUM_EXPERTS / 2), experts, x, gate)
    assert plan.num_dropped == 0
    torch.testing.assert_close(got, exact, rtol=0, atol=0)


def test_a_token_dropped_everywhere_passes_through_as_zero(layer):
    experts, _, x = layer
    gate = torch.zeros(NUM_EXPERTS, HIDDEN)
    gate[4, 0], gate[5, 0] = 50.0, 40.0  # every token with x[:, 0] > 0 picks experts 4 and 5
    xs = x.clone()
    xs[:, 0] = xs[:, 0].abs() + 1.0
    got, plan, _ = run(dispatcher_with(0.3), experts, xs, gate)
    cap = expert_capacity(40, 2, NUM_EXPERTS, 0.3)
    assert plan.num_dropped == 2 * (40 - cap)
    assert (got[cap:] == 0).all() and (got[:cap] != 0).any()


def test_bad_capacity_factor_is_refused():
    with pytest.raises(ValueError, match="capacity_factor"):
        dispatcher_with(0.0)
