"""The HuggingFace Mixtral tensor names and the shape each must have.

The single source of truth for the checkpoint layout: the loader validates against it,
the demo checkpoint writes it, and the model maps it onto its own parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

from workers.weights.config import ModelConfig

Shape = tuple[int, ...]
EXPERT_PROJECTIONS = ("w1", "w2", "w3")


def expert_weight_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"


def expert_weight_shapes(cfg: ModelConfig, layer: int, expert: int) -> dict[str, Shape]:
    """w1 and w3 map hidden → intermediate; w2 maps intermediate → hidden."""
    H, F = cfg.hidden_size, cfg.intermediate_size
    return {
        expert_weight_name(layer, expert, "w1"): (F, H),
        expert_weight_name(layer, expert, "w2"): (H, F),
        expert_weight_name(layer, expert, "w3"): (F, H),
    }


def attention_weight_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Everything that is not an expert: embeddings, attention, norms, routers, LM head."""
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim_
    q_out, kv_out = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (H,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (H,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_out, H)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_out, H)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_out, H)
        shapes[f"{p}.self_attn.o_proj.weight"] = (H, q_out)
        shapes[f"{p}.block_sparse_moe.gate.weight"] = (cfg.num_local_experts, H)
    shapes["model.norm.weight"] = (H,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def all_expert_pairs(cfg: ModelConfig) -> list[tuple[int, int]]:
    return [(i, e) for i in range(cfg.num_hidden_layers) for e in range(cfg.num_local_experts)]


def expert_shapes_for(cfg: ModelConfig, pairs: Iterable[tuple[int, int]]) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for layer, expert in pairs:
        if not (0 <= layer < cfg.num_hidden_layers and 0 <= expert < cfg.num_local_experts):
            raise ValueError(f"(layer, expert) = ({layer}, {expert}) is outside the model")
        shapes.update(expert_weight_shapes(cfg, layer, expert))
    return shapes


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Every tensor a complete checkpoint must hold, and nothing else."""
    return {**attention_weight_shapes(cfg), **expert_shapes_for(cfg, all_expert_pairs(cfg))}
