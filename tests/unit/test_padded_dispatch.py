"""Padding rows of a padded decode step are neither sent, computed nor counted (AllToAllDispatcher.padding
over low-latency dispatch), on the loopback transport: one rank holding every expert."""

from __future__ import annotations

import pytest
import torch

from cluster.placement import place_experts
from workers.comm.transport import LocalTransport
from workers.moe.a2a_dispatcher import AllToAllDispatcher
from workers.moe.block import moe_block
from workers.moe.experts import LayerExperts

HIDDEN, INTER, NUM_EXPERTS = 16, 24, 8


class _Expert:
    def __init__(self, g: torch.Generator) -> None:
        self.w1 = torch.randn(INTER, HIDDEN, generator=g) * 0.3
        self.w2 = torch.randn(HIDDEN, INTER, generator=g) * 0.3
        self.w3 = torch.randn(INTER, HIDDEN, generator=g) * 0.3


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(3)
    experts = LayerExperts.stack({e: _Expert(g) for e in range(NUM_EXPERTS)})
    gate = torch.randn(NUM_EXPERTS, HIDDEN, generator=g)
    x = torch.randn(9, HIDDEN, generator=g)
    return experts, gate, x


def dispatcher(cls):
    expert_map = place_experts(1, NUM_EXPERTS, 1).to_expert_map(first_expert_rank=0)
    return cls(0, expert_map, LocalTransport())


def test_padding_rows_are_not_sent_and_real_rows_are_unchanged(layer):
    experts, gate, x = layer
    real = 6
    want = moe_block(0, x[:real], gate, 2, dispatcher(AllToAllDispatcher), experts)  # exact, real rows only
    d = dispatcher(AllToAllDispatcher)
    d.begin_step(x.shape[0])
    with d.padding(torch.arange(x.shape[0]) < real):
        got = moe_block(0, x, gate, 2, d, experts)
    torch.testing.assert_close(got[:real], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[real:], torch.zeros(x.shape[0] - real, HIDDEN))  # no expert output at all
    snap = d.stats.snapshot_and_reset()
    assert sum(snap.tokens_per_expert.values()) == real * 2  # padding is not load


def test_without_a_mask_it_is_the_plain_dispatcher(layer):
    experts, gate, x = layer
    plain = dispatcher(AllToAllDispatcher)
    plain.begin_step(9)
    want = moe_block(0, x, gate, 2, plain, experts)
    d = dispatcher(AllToAllDispatcher)
    d.begin_step(9)
    torch.testing.assert_close(moe_block(0, x, gate, 2, d, experts), want, rtol=0, atol=0)
    with d.padding(torch.ones(9, dtype=torch.bool)):  # every row real: the same numbers
        torch.testing.assert_close(moe_block(0, x, gate, 2, d, experts), want, rtol=0, atol=0)


def test_a_mask_needs_low_latency_dispatch(layer):
    experts, gate, x = layer
    d = dispatcher(AllToAllDispatcher)
    d.begin_step(None)
    with d.padding(torch.ones(9, dtype=torch.bool)), pytest.raises(RuntimeError, match="low-latency"):
        moe_block(0, x, gate, 2, d, experts)
