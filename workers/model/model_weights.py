"""Tensors of the model, grouped the way workers hold them.

An attention worker holds `AttentionSideWeights` (everything but the experts); an expert
worker holds `LayerExperts` for its (layer, expert) pairs. Both are built from HF tensor
names, so the checkpoint layout is known in one place (weight_names.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from workers.model.attention import AttentionWeights
from workers.moe.experts import ExpertTensorsLike, LayerExperts
from workers.moe.linear import PackedLinear
from workers.weights.config import ModelConfig


@dataclass(frozen=True)
class DecoderLayerWeights:
    input_norm_H: torch.Tensor
    attention: AttentionWeights
    post_attention_norm_H: torch.Tensor
    gate_EH: torch.Tensor  # the router


@dataclass(frozen=True)
class AttentionSideWeights:
    embed_VH: torch.Tensor
    layers: tuple[DecoderLayerWeights, ...]
    norm_H: torch.Tensor
    lm_head_VH: torch.Tensor
    lm_head: PackedLinear = field(init=False, repr=False, compare=False)  # lm_head_VH, packed once

    def __post_init__(self) -> None:
        object.__setattr__(self, "lm_head", PackedLinear.pack(self.lm_head_VH))

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> AttentionSideWeights:
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            layers.append(DecoderLayerWeights(
                input_norm_H=state[f"{p}.input_layernorm.weight"],
                attention=AttentionWeights(
                    wq=state[f"{p}.self_attn.q_proj.weight"], wk=state[f"{p}.self_attn.k_proj.weight"],
                    wv=state[f"{p}.self_attn.v_proj.weight"], wo=state[f"{p}.self_attn.o_proj.weight"],
                ),
                post_attention_norm_H=state[f"{p}.post_attention_layernorm.weight"],
                gate_EH=state[f"{p}.block_sparse_moe.gate.weight"],
            ))
        embed = state["model.embed_tokens.weight"]
        lm_head = embed if cfg.tie_word_embeddings else state["lm_head.weight"]
        return cls(embed_VH=embed, layers=tuple(layers), norm_H=state["model.norm.weight"],
                   lm_head_VH=lm_head)


def experts_by_layer(experts: Mapping[tuple[int, int], ExpertTensorsLike]) -> dict[int, LayerExperts]:
    """Group (layer, expert) → tensors into one stacked LayerExperts per layer."""
    grouped: dict[int, dict[int, ExpertTensorsLike]] = {}
    for (layer, expert), tensors in experts.items():
        grouped.setdefault(layer, {})[expert] = tensors
    return {layer: LayerExperts.stack(by_expert) for layer, by_expert in sorted(grouped.items())}
