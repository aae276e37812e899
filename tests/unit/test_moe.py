"""route → dispatch → experts → combine against slow references."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.moe.block import moe_block
from workers.moe.dispatcher import LocalDispatcher
from workers.moe.experts import LayerExperts, reference_experts, swiglu
from workers.moe.route import route


class _Expert:
    def __init__(self, g: torch.Generator, hidden: int, inter: int) -> None:
        self.w1 = torch.randn(inter, hidden, generator=g) * 0.3
        self.w2 = torch.randn(hidden, inter, generator=g) * 0.3
        self.w3 = torch.randn(inter, hidden, generator=g) * 0.3


def make_layer(num_experts: int, hidden: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    experts = LayerExperts.stack({e: _Expert(g, hidden, inter) for e in range(num_experts)})
    gate = torch.randn(num_experts, hidden, generator=g)
    return experts, gate


@settings(max_examples=40, deadline=None)
@given(num_tokens=st.integers(0, 40), num_experts=st.integers(1, 9), data=st.data())
def test_grouped_equals_per_expert_reference(num_tokens, num_experts, data):
    top_k = data.draw(st.integers(1, num_experts))
    hidden, inter = data.draw(st.sampled_from([(8, 12), (17, 5), (32, 64)]))
    experts, gate = make_layer(num_experts, hidden, inter, seed=num_tokens)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(7))
    got = moe_block(0, x, gate, top_k, LocalDispatcher(num_experts), experts)
    routing = route(x, gate, top_k)
    ref = reference_experts(x, routing.topk_ids_TK, routing.topk_weights_TK, experts)
    assert got.shape == (num_tokens, hidden)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_one_expert_top1_is_a_dense_swiglu():
    experts, gate = make_layer(1, 24, 40)
    x = torch.randn(33, 24)
    got = moe_block(0, x, gate, 1, LocalDispatcher(len(experts.expert_ids)), experts)
    dense = swiglu(x, experts.w13_EFH[0], experts.w2_EHF[0])
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6)


def test_only_routed_experts_run():
    experts, gate = make_layer(8, 16, 8)
    # Make expert 3 poisonous: if it ran on any token the output would be NaN.
    experts.w13_EFH[3].fill_(float("nan"))
    gate = torch.zeros_like(gate)
    gate[0], gate[1] = 5.0, 4.0  # every positive token picks experts 0 and 1
    x = torch.rand(10, 16) + 0.1
    out = moe_block(0, x, gate, 2, LocalDispatcher(len(experts.expert_ids)), experts)
    assert torch.isfinite(out).all()


@settings(max_examples=50, deadline=None)
@given(num_tokens=st.integers(1, 30), num_experts=st.integers(1, 10), scale=st.floats(0.0, 100.0),
       data=st.data())
def test_routing_weights_are_a_distribution(num_tokens, num_experts, scale, data):
    top_k = data.draw(st.integers(1, num_experts))
    g = torch.Generator().manual_seed(num_tokens * 31 + num_experts)
    x = torch.randn(num_tokens, 12, generator=g) * scale
    gate = torch.randn(num_experts, 12, generator=g)
    r = route(x, gate, top_k)
    w = r.topk_weights_TK
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(num_tokens), rtol=0, atol=1e-5)
    assert r.topk_ids_TK.shape == (num_tokens, top_k)
    # top-k ids are distinct per token
    assert all(len(set(row)) == top_k for row in r.topk_ids_TK.tolist())


def test_matches_transformers_sparse_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=20, num_local_experts=5, num_experts_per_tok=2)
    hf = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    F_ = cfg.intermediate_size

    class _FromHF:
        def __init__(self, e):
            gate_up, down = hf.experts.gate_up_proj[e].detach(), hf.experts.down_proj[e].detach()
            self.w1, self.w3, self.w2 = gate_up[:F_], gate_up[F_:], down

    experts = LayerExperts.stack({e: _FromHF(e) for e in range(5)})
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        ref = hf(x)
        ref = ref[0] if isinstance(ref, tuple) else ref
    dispatcher = LocalDispatcher(len(experts.expert_ids))
    got = moe_block(0, x.reshape(-1, 32), hf.gate.weight.detach(), 2, dispatcher, experts)
    torch.testing.assert_close(got, ref.reshape(-1, 32), rtol=1e-5, atol=1e-5)
