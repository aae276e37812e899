"""Router skew for the demo checkpoint: a few "hot" experts per layer win most tokens' routing.

Random routers spread tokens fairly evenly over experts, so the demo model shows no expert-load
imbalance to rebalance. `skew_routers` tilts each layer's router toward ceil(E/4) hot experts
(the first of a seeded per-layer permutation) by adding to their gate rows a push along one
shared direction u_l:

    gate_EH[hot] += skew * PUSH_PER_SKEW * |gate row| * u_l

A hot expert's logit on a token with normed hidden state h_H then grows by that push times
(h_H · u_l); the other experts' logits are unchanged. This only skews routing if h_H · u_l > 0
for most tokens, so u_l must be a direction almost every hidden state shares.

Why the BOS token's router input is such a direction: every sequence starts with BOS, and every
later token attends to it (it is the one key in every context, the "attention sink"), so a part
of BOS's own hidden state is mixed into every token's residual stream, layer after layer. On
the demo corpus a token's router input (norm sqrt(H) = 16) has a component of about 2 (layer 0)
to 4 (layer 3) along u_l, positive for 78% of tokens at layer 0 and for over 98% from layer 2
on. A gate row has length about 2 (gain 2 fan-in init), so each unit of skew adds about 2 to 4
to a hot expert's logit on a typical token, where router logits spread with std 2. Measured on
demo corpus text (seed 0, top-2 of 8, tests/integration/test_demo_router_skew.py), the two hot
experts of a layer get on average 27% of the top-2 picks at skew 0 (uniform: 25%), 60% at
skew 1 and 74% at skew 2; the busiest expert's count over the mean goes from 1.6 to 2.5 and 3.1.

BOS's router input needs no corpus and no KV cache: a lone token at position 0 has rotary angle
zero and attends only to itself, so its attention output is o_proj(v_proj(h)), repeated over
each key/value head's query heads. It is computed in float64 and layer by layer with the skewed
routers of the layers before (they change BOS's own MoE output), so the same weights give the
same float32 bytes on any machine (float64 rounding differences stay far below float32's).

Shapes: H hidden, E experts, K top-k, F expert intermediate, G key/value heads, D head dim.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from workers.weights.config import ModelConfig
from workers.weights.weight_names import expert_weight_name

PUSH_PER_SKEW = 0.5  # of a gate row's own length, per unit of skew
HOT_FRACTION = 0.25  # of each layer's experts


def check_router_skew(skew: float) -> float:
    if not math.isfinite(skew) or skew < 0:
        raise ValueError(f"router skew must be a finite number >= 0, got {skew}")
    return float(skew)


def hot_experts(layer: int, num_experts: int, seed: int) -> list[int]:
    """The experts layer `layer`'s router favours: the first ceil(E/4) of a seeded permutation."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:hot-experts:{layer}".encode()))
    num_hot = math.ceil(num_experts * HOT_FRACTION)
    return sorted(torch.randperm(num_experts, generator=gen)[:num_hot].tolist())


def skew_routers(tensors: dict[str, torch.Tensor], cfg: ModelConfig, skew: float,
                 seed: int) -> dict[str, torch.Tensor]:
    """`tensors` with every layer's gate rows of its hot experts pushed along BOS's router input."""
    check_router_skew(skew)
    if skew == 0:
        return tensors
    out = dict(tensors)
    w = {name: t.double() for name, t in tensors.items()}
    x_H = w["model.embed_tokens.weight"][cfg.bos_token_id]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        x_H = x_H + _lone_token_attention(_rms_norm(x_H, w[f"{p}.input_layernorm.weight"], cfg), w, p, cfg)
        h_H = _rms_norm(x_H, w[f"{p}.post_attention_layernorm.weight"], cfg)
        gate_name = f"{p}.block_sparse_moe.gate.weight"
        gate_EH = w[gate_name].clone()
        hot = hot_experts(layer, cfg.num_local_experts, seed)
        push_H = (skew * PUSH_PER_SKEW) * (h_H / h_H.norm())
        gate_EH[hot] += gate_EH[hot].norm(dim=-1, keepdim=True) * push_H
        out[gate_name] = gate_EH.to(tensors[gate_name].dtype)
        x_H = x_H + _moe(h_H, gate_EH, w, layer, cfg)
    return out


def _rms_norm(x_H: torch.Tensor, weight_H: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return weight_H * x_H * torch.rsqrt(x_H.pow(2).mean() + cfg.rms_norm_eps)


def _lone_token_attention(h_H: torch.Tensor, w: dict[str, torch.Tensor], p: str,
                          cfg: ModelConfig) -> torch.Tensor:
    """Attention of a single token at position 0: each query head's output is its kv head's v."""
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    v_GD = (w[f"{p}.self_attn.v_proj.weight"] @ h_H).view(cfg.num_key_value_heads, cfg.head_dim_)
    return w[f"{p}.self_attn.o_proj.weight"] @ v_GD.repeat_interleave(group, dim=0).flatten()


def _moe(h_H: torch.Tensor, gate_EH: torch.Tensor, w: dict[str, torch.Tensor], layer: int,
         cfg: ModelConfig) -> torch.Tensor:
    """Mixtral's MoE on one token: softmax, top-k, renormalised weights, SwiGLU experts."""
    weights_K, ids_K = torch.softmax(gate_EH @ h_H, dim=-1).topk(cfg.num_experts_per_tok)
    weights_K = weights_K / weights_K.sum()
    y_H = torch.zeros_like(h_H)
    for weight, expert in zip(weights_K.tolist(), ids_K.tolist(), strict=True):
        w1_FH, w2_HF, w3_FH = (w[expert_weight_name(layer, expert, proj)] for proj in ("w1", "w2", "w3"))
        y_H += weight * (w2_HF @ (F.silu(w1_FH @ h_H) * (w3_FH @ h_H)))
    return y_H
