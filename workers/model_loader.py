"""Build a single-process MixtralModel (all experts local) from a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.checkpoint import Checkpoint
from workers.dispatcher import LocalDispatcher
from workers.mixtral import MixtralModel
from workers.model_weights import AttentionSideWeights, experts_by_layer
from workers.weight_names import all_expert_pairs


def load_local_model(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                     progress: bool = False) -> MixtralModel:
    ckpt = Checkpoint.open(model_dir)
    cfg = ckpt.config
    attention_side = AttentionSideWeights.from_state(
        cfg, ckpt.load_attention_weights(dtype, progress=progress))
    experts = ckpt.load_expert_weights(all_expert_pairs(cfg), dtype, progress=progress)
    return MixtralModel(cfg, attention_side, LocalDispatcher(experts_by_layer(experts)))
