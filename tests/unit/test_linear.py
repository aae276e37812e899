"""PackedLinear (oneDNN pre-packed weights) against its reference, plain `F.linear`."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from workers.moe.block import moe_block
from workers.moe.dispatcher import LocalDispatcher
from workers.moe.experts import LayerExperts, reference_experts
from workers.moe.linear import ENV_VAR, MIN_PACKED_NUMEL, PackedLinear, _ops_work
from workers.moe.route import route


@pytest.fixture(autouse=True)
def packing_on(monkeypatch):
    """Whatever the caller's environment says; the one test of the switch turns it off itself."""
    monkeypatch.setenv(ENV_VAR, "1")


needs_ops = pytest.mark.skipif(not _ops_work(torch.float32), reason="this torch build cannot pack for oneDNN")
ROW_COUNTS = (0, 1, 2, 3, 8, 17, 64)


def weight(out_features: int, in_features: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)


def assert_relative_close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if ref.numel():
        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
        assert err <= tol, err


@needs_ops
@pytest.mark.parametrize("rows", ROW_COUNTS)
def test_packed_fp32_matches_f_linear(rows):
    w = weight(1024, 512)
    lin = PackedLinear.pack(w)
    assert lin.is_packed
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    assert_relative_close(lin(x), F.linear(x, w), 1e-5)


@needs_ops
@pytest.mark.parametrize("rows", ROW_COUNTS)
def test_packed_bf16_matches_f_linear(rows):
    if not _ops_work(torch.bfloat16):
        pytest.skip("no bf16 oneDNN linear here")
    w = weight(1024, 512, torch.bfloat16)
    lin = PackedLinear.pack(w)
    assert lin.is_packed
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    assert_relative_close(lin(x), F.linear(x, w), 2e-2)


@needs_ops
def test_packed_takes_any_leading_shape_and_strided_input():
    w = weight(768, 384)
    lin = PackedLinear.pack(w)
    x_3d = torch.randn(3, 5, 384)
    assert_relative_close(lin(x_3d), F.linear(x_3d, w), 1e-5)
    x_strided = torch.randn(384, 6).t()  # [6, 384], not contiguous
    assert_relative_close(lin(x_strided), F.linear(x_strided, w), 1e-5)


def test_disabled_by_env_var_is_exactly_f_linear(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "0")
    w = weight(1024, 512)
    lin = PackedLinear.pack(w)
    assert not lin.is_packed
    for rows in ROW_COUNTS:
        x = torch.randn(rows, 512)
        assert torch.equal(lin(x), F.linear(x, w))


@needs_ops
def test_small_grad_or_odd_weights_are_not_packed():
    assert not PackedLinear.pack(weight(64, 64)).is_packed  # under the threshold
    assert PackedLinear.pack(weight(64, 64), min_numel=0).is_packed
    assert not PackedLinear.pack(weight(1024, 512, torch.float64)).is_packed
    assert not PackedLinear.pack(weight(1024, 512).requires_grad_()).is_packed
    assert MIN_PACKED_NUMEL > 64 * 64


@needs_ops
def test_pickle_repacks():
    w = weight(1024, 512)
    lin = pickle.loads(pickle.dumps(PackedLinear.pack(w)))
    assert lin.is_packed and torch.equal(lin.weight_OI, w)
    x = torch.randn(4, 512)
    assert_relative_close(lin(x), F.linear(x, w), 1e-5)


class _Expert:
    def __init__(self, g: torch.Generator, hidden: int, inter: int) -> None:
        self.w1 = torch.randn(inter, hidden, generator=g) * 0.05
        self.w2 = torch.randn(hidden, inter, generator=g) * 0.05
        self.w3 = torch.randn(inter, hidden, generator=g) * 0.05


@needs_ops
@pytest.mark.parametrize("num_tokens", [0, 1, 5, 40])
def test_grouped_packed_experts_match_plain_reference(num_tokens):
    hidden, inter, num_experts = 256, 1024, 4  # w13 [2048, 256] and w2 [256, 1024]: both packed
    g = torch.Generator().manual_seed(num_tokens)
    experts = LayerExperts.stack({e: _Expert(g, hidden, inter) for e in range(num_experts)})
    assert all(lin.is_packed for lin in experts.w13 + experts.w2)
    gate = torch.randn(num_experts, hidden, generator=g)
    x = torch.randn(num_tokens, hidden, generator=g)
    got = moe_block(0, x, gate, 2, LocalDispatcher(len(experts.expert_ids)), experts)
    routing = route(x, gate, 2)
    ref = reference_experts(x, routing.topk_ids_TK, routing.topk_weights_TK, experts)
    assert_relative_close(got, ref, 1e-5)


@needs_ops
def test_layer_experts_survive_pickle():
    g = torch.Generator().manual_seed(0)
    experts = LayerExperts.stack({e: _Expert(g, 256, 1024) for e in range(2)})
    back = pickle.loads(pickle.dumps(experts))
    assert back.expert_ids == experts.expert_ids and all(lin.is_packed for lin in back.w13 + back.w2)
    x = torch.randn(3, 256)
    assert_relative_close(back.w13[1](x), experts.w13[1](x), 0.0)


def test_falls_back_when_the_ops_are_missing(monkeypatch):
    monkeypatch.setattr("workers.moe.linear._ops_work", lambda dtype: False)
    w = weight(1024, 512)
    lin = PackedLinear.pack(w)
    assert not lin.is_packed
    x = torch.randn(4, 512)
    assert torch.equal(lin(x), F.linear(x, w))
