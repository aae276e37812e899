"""AllToAllDispatcher across real processes (gloo over loopback) against LocalDispatcher.

Each test starts one process per rank: attention ranks 0..A-1 own tokens, expert ranks
A..A+X-1 own experts, and every rank runs route → dispatch → experts → combine for every
layer. Every attention rank checks its output against the local dispatcher on the same
tokens; every rank checks the expert-side token counts. Several scenarios share one
process group per world size, so a test pays for process start-up once.

Processes come from a forkserver: a fresh interpreter (nothing inherited from pytest, as
with spawn) that imports torch and this module once and then forks every rank, which is
several times faster than spawn's fresh import per rank on a small machine. Children
compare with `torch.allclose`, not `torch.testing.assert_close`, whose first call imports
sympy (half a second per process).
"""

from __future__ import annotations

import multiprocessing.forkserver
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.placement import place_experts
from workers.comm.transport import LocalTransport, init_process_group, pick_free_port
from workers.moe.a2a_dispatcher import AllToAllDispatcher
from workers.moe.block import experts_stage, moe_block
from workers.moe.capacity import keep_within_capacity
from workers.moe.dispatcher import LocalDispatcher
from workers.moe.experts import LayerExperts, reference_experts
from workers.moe.route import Routing, empty_routing, route

HIDDEN, INTER = 16, 24
LOOPBACK = "127.0.0.1"  # the test's choice; the library always takes the address from its caller


@dataclass(frozen=True)
class Scenario:
    name: str
    tokens_per_attention_rank: tuple[int, ...]
    num_expert_workers: int
    num_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    replicas: dict = field(default_factory=dict)
    load: dict | None = None
    gate: str = "random"  # or "fixed": every token picks the same experts
    capacity_factor: float | None = None
    dtype: torch.dtype = torch.float32
    low_latency: bool = False  # fixed-capacity buffers sized for the most tokens on one rank

    @property
    def low_latency_tokens(self) -> int | None:
        return max(self.tokens_per_attention_rank) if self.low_latency else None

    @property
    def num_attention(self) -> int:
        return len(self.tokens_per_attention_rank)

    @property
    def world_size(self) -> int:
        return self.num_attention + self.num_expert_workers


class _Expert:
    def __init__(self, g: torch.Generator) -> None:
        self.w1 = torch.randn(INTER, HIDDEN, generator=g) * 0.3
        self.w2 = torch.randn(HIDDEN, INTER, generator=g) * 0.3
        self.w3 = torch.randn(INTER, HIDDEN, generator=g) * 0.3


def model_for(sc: Scenario) -> tuple[list[dict[int, _Expert]], list[torch.Tensor]]:
    """Every expert and gate of every layer: each rank builds the same ones from the seed."""
    g = torch.Generator().manual_seed(sum(map(ord, sc.name)))
    experts = [{e: _Expert(g) for e in range(sc.num_experts)} for _ in range(sc.num_layers)]
    gates = []
    for _ in range(sc.num_layers):
        gate = torch.randn(sc.num_experts, HIDDEN, generator=g)
        if sc.gate == "fixed":  # positive tokens all pick experts 3 then 5
            gate = torch.zeros_like(gate)
            gate[3], gate[5] = 5.0, 4.0
        gates.append(gate)
    return experts, gates


def tokens_for(sc: Scenario, attention_rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + attention_rank)
    x = torch.randn(sc.tokens_per_attention_rank[attention_rank], HIDDEN, generator=g)
    return (x.abs() + 0.1 if sc.gate == "fixed" else x).to(sc.dtype)


def stack(tensors: dict[int, _Expert], ids: tuple[int, ...], dtype: torch.dtype) -> LayerExperts:
    ex = LayerExperts.stack({e: tensors[e] for e in ids})
    return LayerExperts(ex.expert_ids, ex.w13_EFH.to(dtype), ex.w2_EHF.to(dtype))


def run_rank(rank: int, sc: Scenario, transport) -> None:
    """One rank's side of a scenario; asserts on its own results."""
    placement = place_experts(sc.num_layers, sc.num_experts, sc.num_expert_workers, sc.replicas, sc.load)
    expert_map = placement.to_expert_map(first_expert_rank=sc.num_attention)
    all_experts, gates = model_for(sc)
    mine = {layer: stack(all_experts[layer], expert_map.local_experts(layer, rank), sc.dtype)
            for layer in range(sc.num_layers) if expert_map.local_experts(layer, rank)}
    expert_map.check_holds(rank, {layer: ex.expert_ids for layer, ex in mine.items()})
    dispatcher = AllToAllDispatcher(rank, expert_map, transport, capacity_factor=sc.capacity_factor)
    dispatcher.begin_step(sc.low_latency_tokens)

    is_attention = rank < sc.num_attention
    x = tokens_for(sc, rank) if is_attention else torch.empty(0, HIDDEN, dtype=sc.dtype)
    h = x
    local = LocalDispatcher(sc.num_experts)
    every = {layer: stack(all_experts[layer], tuple(range(sc.num_experts)), sc.dtype)
             for layer in range(sc.num_layers)}
    routed = torch.zeros(sc.num_layers, sc.num_experts, dtype=torch.long)  # assignments this rank sent
    num_dropped = 0
    for layer in range(sc.num_layers):
        gate = gates[layer].to(sc.dtype)
        routing = route(h, gate, sc.top_k) if is_attention else empty_routing(sc.top_k)
        x_M, plan = dispatcher.dispatch(layer, h, routing)
        y_M = experts_stage(x_M, plan, mine.get(layer))
        out = dispatcher.combine(layer, y_M, plan)
        assert out.shape == h.shape and out.dtype == sc.dtype

        if sc.capacity_factor is None:
            kept = torch.ones_like(routing.topk_ids_TK, dtype=torch.bool)
            expected = moe_block(layer, h, gate, sc.top_k, local, every[layer])
        else:  # the oracle for drops: the per-expert loop with dropped weights zeroed
            kept = keep_within_capacity(routing.topk_ids_TK, sc.num_experts, sc.capacity_factor)
            expected = reference_experts(h, routing.topk_ids_TK, routing.topk_weights_TK * kept,
                                         every[layer])
        assert plan.num_dropped == int((~kept).sum())
        num_dropped += plan.num_dropped
        routed[layer] += torch.bincount(routing.topk_ids_TK[kept], minlength=sc.num_experts)
        tol = 1e-5 if sc.dtype == torch.float32 else 2e-2
        assert torch.allclose(out, expected, rtol=tol, atol=tol), \
            (sc.name, layer, rank, float((out.float() - expected.float()).abs().max()))
        h = h + out  # the next layer's input, as in the model; each layer is checked on the same h

    # Expert side: what every copy received adds up to what the attention ranks routed.
    snap = dispatcher.stats.snapshot_and_reset()
    assert snap.num_dispatches == sc.num_layers and snap.num_dropped == num_dropped
    everyone: list = [None] * sc.world_size
    dist.all_gather_object(everyone, (snap.tokens_per_expert, routed))
    total_routed = sum(r for _, r in everyone)
    for layer in range(sc.num_layers):
        for e in range(sc.num_experts):
            copies = [tpe.get((layer, e), 0) for tpe, _ in everyone[sc.num_attention:]]
            assert sum(copies) == int(total_routed[layer, e]), (sc.name, layer, e)
            shares = [copies[w] for w in placement.workers_of(layer, e)]
            # Each attention rank splits evenly, so copies differ by at most one row per rank.
            assert max(shares) - min(shares) <= sc.num_attention, (sc.name, layer, e, shares)


def check_uneven_all_to_all(rank: int, world: int, transport) -> None:
    """The bare transport: uneven and zero splits, counts exchanged, values land in order."""
    send = [(rank + dst) % 3 for dst in range(world)]
    x = torch.cat([torch.full((n, 2), float(100 * rank + dst)) for dst, n in enumerate(send)])
    y, recv = transport.all_to_all(x, send)
    assert recv == tuple((src + rank) % 3 for src in range(world))
    want = torch.cat([torch.full((n, 2), float(100 * src + rank)) for src, n in enumerate(recv)])
    assert torch.equal(y, want), (rank, y, want)
    assert transport.last_transfer.bytes_sent == x.nbytes + world * 8


def _child(rank: int, world: int, port: int, scenarios: list[Scenario]) -> None:
    torch.set_num_threads(1)
    transport = init_process_group(rank, world, LOOPBACK, port, backend="gloo", timeout=timedelta(seconds=60))
    try:
        check_uneven_all_to_all(rank, world, transport)
        for sc in scenarios:
            assert sc.world_size == world
            run_rank(rank, sc, transport)
    except BaseException:
        # The parent reports whichever rank it notices first, often a peer that only saw
        # the connection drop; the real failure is in the captured stderr.
        traceback.print_exc()
        raise
    finally:
        transport.destroy()


def spawn(scenarios: list[Scenario]) -> None:
    world = scenarios[0].world_size
    multiprocessing.forkserver.set_forkserver_preload([__name__])
    mp.start_processes(_child, args=(world, pick_free_port(), scenarios), nprocs=world, join=True,
                       start_method="forkserver")


# 8 experts on 3 workers: 3/3/2, and the hottest experts in layer 0 get a second copy.
HOT = {(0, e): float(100 - 10 * e) for e in range(8)} | {(1, e): float(e) for e in range(8)}


@pytest.mark.timeout(180)
def test_one_attention_two_expert_ranks():
    spawn([
        Scenario("basic-1+2", (13,), 2),
        Scenario("bf16-1+2", (11,), 2, dtype=torch.bfloat16),
        Scenario("capacity-1+2", (24,), 2, gate="fixed", capacity_factor=1.0),
        Scenario("top1-1+2", (9,), 2, num_layers=3, top_k=1),
        Scenario("low-latency-1+2", (13,), 2, low_latency=True),
        Scenario("low-latency-bf16-1+2", (11,), 2, dtype=torch.bfloat16, low_latency=True),
        # Every token on the same experts: each segment full, the capacity's worst case.
        Scenario("low-latency-worst-case-1+2", (24,), 2, gate="fixed", low_latency=True),
        Scenario("low-latency-decode-1+2", (1,), 2, num_layers=3, low_latency=True),
    ])


@pytest.mark.timeout(180)
def test_two_attention_three_expert_ranks_uneven():
    spawn([
        Scenario("uneven-2+3", (9, 14), 3),
        Scenario("idle-attention-2+3", (10, 0), 3),
        Scenario("replicated-2+3", (17, 12), 3, replicas={(0, 0): 2, (0, 1): 2, (0, 2): 3, (1, 7): 3}),
        Scenario("load-balanced-2+3", (8, 8), 3, load=HOT, replicas={(0, 0): 2, (0, 1): 2}),
        Scenario("all-replicated-2+3", (15, 6), 3, num_layers=1, replicas={(0, e): 2 for e in range(8)}),
        Scenario("low-latency-uneven-2+3", (9, 14), 3, low_latency=True),
        Scenario("low-latency-empty-rank-2+3", (10, 0), 3, low_latency=True),
        Scenario("low-latency-replicated-2+3", (17, 12), 3, replicas={(0, 0): 2, (0, 1): 2, (0, 2): 3},
                 low_latency=True),
    ])


@pytest.mark.timeout(180)
def test_two_attention_four_expert_ranks():
    spawn([
        Scenario("basic-2+4", (7, 12), 4),
        Scenario("same-expert-2+4", (10, 5), 4, gate="fixed"),
        Scenario("more-workers-than-experts-2+4", (6, 6), 4, num_experts=3),
        Scenario("capacity-2+4", (16, 4), 4, capacity_factor=0.5),
        Scenario("low-latency-same-expert-2+4", (10, 5), 4, gate="fixed", low_latency=True),
        # Experts on 3 of 4 workers: the fourth is no destination and receives nothing.
        Scenario("low-latency-more-workers-than-experts-2+4", (6, 6), 4, num_experts=3, low_latency=True),
        Scenario("low-latency-top1-2+4", (8, 3), 4, top_k=1, low_latency=True),
    ])


def loopback(name: str, num_tokens: int):
    """One rank holding every expert of one layer over the loopback transport."""
    sc = Scenario(name, (num_tokens,), 1, num_layers=1)
    all_experts, gates = model_for(sc)
    expert_map = place_experts(1, 8, 1).to_expert_map(first_expert_rank=0)
    dispatcher = AllToAllDispatcher(0, expert_map, LocalTransport())
    return dispatcher, stack(all_experts[0], tuple(range(8)), torch.float32), gates[0], tokens_for(sc, 0)


def test_world_size_one_is_the_local_dispatcher():
    """One rank holding every expert over the loopback transport: the same numbers as LocalDispatcher."""
    dispatcher, experts, gate, x = loopback("loopback", 21)
    got = moe_block(0, x, gate, 2, dispatcher, experts)
    want = moe_block(0, x, gate, 2, LocalDispatcher(8), experts)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    snap = dispatcher.stats.snapshot_and_reset()
    assert sum(snap.tokens_per_expert.values()) == 21 * 2
    assert snap.dispatch_bytes_sent > 0 and snap.combine_bytes_received == 21 * 2 * HIDDEN * 4
    assert dispatcher.stats.snapshot_and_reset().num_dispatches == 0


def test_world_size_one_low_latency_equals_exact():
    dispatcher, experts, gate, x = loopback("loopback-low-latency", 9)
    exact = moe_block(0, x, gate, 2, dispatcher, experts)
    dispatcher.begin_step(16)  # more room than tokens: padding on every segment
    low_latency = moe_block(0, x, gate, 2, dispatcher, experts)
    torch.testing.assert_close(low_latency, exact, rtol=1e-6, atol=1e-6)
    snap = dispatcher.stats.snapshot_and_reset()
    assert snap.num_dispatches == 2 and sum(snap.tokens_per_expert.values()) == 2 * 9 * 2
    with pytest.raises(ValueError, match="buffers hold 4"):
        dispatcher.begin_step(4)
        moe_block(0, x, gate, 2, dispatcher, experts)


def test_experts_given_must_match_the_map():
    expert_map = place_experts(1, 4, 1).to_expert_map(first_expert_rank=0)
    g = torch.Generator().manual_seed(0)
    wrong = LayerExperts.stack({e: _Expert(g) for e in (0, 1)})
    with pytest.raises(ValueError, match="should hold experts"):
        expert_map.check_holds(0, {0: wrong.expert_ids})
    with pytest.raises(ValueError, match="rank"):
        AllToAllDispatcher(1, expert_map, LocalTransport())


def test_routing_of_zero_tokens_on_the_loopback():
    expert_map = place_experts(1, 4, 1).to_expert_map(first_expert_rank=0)
    g = torch.Generator().manual_seed(0)
    experts = {0: LayerExperts.stack({e: _Expert(g) for e in range(4)})}
    dispatcher = AllToAllDispatcher(0, expert_map, LocalTransport())
    x = torch.empty(0, HIDDEN)
    x_M, plan = dispatcher.dispatch(0, x, Routing(torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2)))
    out = dispatcher.combine(0, experts_stage(x_M, plan, experts[0]), plan)
    assert out.shape == (0, HIDDEN) and plan.recv_expert_counts == (0, 0, 0, 0)
