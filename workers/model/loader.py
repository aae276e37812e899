"""Build a single-process MixtralModel (all experts local) from a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.model.mixtral import MixtralModel
from workers.model.model_weights import AttentionSideWeights, experts_by_layer
from workers.moe.dispatcher import LocalDispatcher
from workers.weights.checkpoint import Checkpoint
from workers.weights.weight_names import all_expert_pairs

CPU = torch.device("cpu")


def load_local_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: torch.device = CPU,
                     progress: bool = False, checkpoint: Checkpoint | None = None) -> MixtralModel:
    """Every weight, read straight onto `device` (a GPU gets no host copy of the checkpoint)."""
    ckpt = checkpoint or Checkpoint.open(model_dir)
    cfg = ckpt.config
    attention_side = AttentionSideWeights.from_state(
        cfg, ckpt.load_attention_weights(dtype, progress=progress, device=device))
    experts = ckpt.load_expert_weights(all_expert_pairs(cfg), dtype, progress=progress, device=device)
    return MixtralModel(cfg, attention_side, LocalDispatcher(cfg.num_local_experts),
                        experts_by_layer(experts))


def local_weight_bytes(checkpoint: Checkpoint, dtype: torch.dtype) -> int:
    """What `load_local_model` will hold: the attention side and every expert."""
    return (checkpoint.attention_weight_bytes(dtype)
            + checkpoint.expert_weight_bytes(all_expert_pairs(checkpoint.config), dtype))
