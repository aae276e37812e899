"""The Mixtral decoder, parallelism-agnostic.

    x = embed(ids)
    for each layer:  x += attention(norm(x));  x += moe(norm(x))
    logits = lm_head(norm(x))

The MoE block goes through whatever Dispatcher it is given (local or all-to-all), over the
experts this process holds;
attention reads and writes the paged KV cache it is given. Nothing here knows about Ray.

Shapes: T tokens in the step, H hidden, S sequences sampled this step, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from workers.model.attention import attention
from workers.model.attention_metadata import AttentionMetadata
from workers.model.kv_cache import KVCache
from workers.model.model_weights import AttentionSideWeights
from workers.model.norm import rms_norm
from workers.model.rope import RotaryEmbedding
from workers.moe.block import moe_block
from workers.moe.dispatcher import Dispatcher
from workers.moe.experts import LayerExperts
from workers.weights.config import ModelConfig


class MixtralModel:
    def __init__(self, cfg: ModelConfig, weights: AttentionSideWeights, dispatcher: Dispatcher,
                 experts: Mapping[int, LayerExperts]) -> None:
        """`experts`: the layers' experts held in this process (all of them single-process; none
        on an attention worker of a model group, whose dispatcher sends every row away)."""
        self.cfg = cfg
        self.weights = weights
        self.dispatcher = dispatcher
        self.experts = dict(experts)
        self.rope = RotaryEmbedding(cfg.head_dim_, cfg.rope_theta, device=weights.embed_VH.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed_VH.dtype

    @torch.inference_mode()
    def forward(self, input_ids_T: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """Final-normed hidden states of every token of the step, [T, H]."""
        cfg, w = self.cfg, self.weights
        x_TH = F.embedding(input_ids_T, w.embed_VH)
        cos_sin = self.rope.cos_sin(meta.positions_T)
        for i, lw in enumerate(w.layers):
            h_TH = rms_norm(x_TH, lw.input_norm_H, cfg.rms_norm_eps)
            x_TH = x_TH + attention(
                h_TH, lw.attention, i, meta, kv_cache, cos_sin,
                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_, cfg.sliding_window,
            )
            h_TH = rms_norm(x_TH, lw.post_attention_norm_H, cfg.rms_norm_eps)
            x_TH = x_TH + moe_block(i, h_TH, lw.gate_EH, cfg.num_experts_per_tok, self.dispatcher,
                                     self.experts.get(i))
        return rms_norm(x_TH, w.norm_H, cfg.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden_SH: torch.Tensor) -> torch.Tensor:
        """fp32 logits, [S, V]: sampling and logprobs want full precision."""
        return self.weights.lm_head(hidden_SH).float()
