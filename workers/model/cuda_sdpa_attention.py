"""Attention through torch's SDPA on a GPU, kept off cuDNN and off dense masks where it can be.

Shapes: T tokens in the step, Q query heads, G key/value heads, D head dim, S decode
sequences, C context length, L query length of a prefill chunk.

Why not the plain path as is: SDPA with an explicit boolean mask is sent to cuDNN, which
built a new plan on every call on an H200 (23 ms of host time per call; a 2-layer decode step
took 48 ms at every batch size; with the memory-efficient backend forced, 6.0 / 7.6 / 10.6 ms
at batch 1 / 16 / 64). So:
- prefill: a chunk whose whole context lies inside every query's window needs only causal
  masking aligned to the chunk's end (`causal_lower_right`), which flash / memory-efficient
  attention apply without a mask tensor; a chunk the window cuts still needs its [L, C] mask.
- decode, where Triton is missing: the plain padded batch.
Both run with cuDNN excluded. Key/value heads are repeated up to the query heads first:
the memory-efficient kernel takes no GQA, and without it an fp32 or masked call would fall
to the math kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from workers.model.attention_metadata import DecodeBatch, PrefillChunk
from workers.model.kv_cache import KVCache

NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def repeat_kv_heads(kv_XGD: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., G, D] → [..., Q, D], query head h reading key/value head h // (Q/G) (HF's repeat_kv)."""
    return kv_XGD.repeat_interleave(num_heads // kv_XGD.shape[-2], dim=-2)


def prefill_without_cudnn(q_TQD: torch.Tensor, out_TQD: torch.Tensor, chunk: PrefillChunk, kv_cache: KVCache,
                          layer: int) -> None:
    Q = q_TQD.shape[1]
    k_CGD, v_CGD = kv_cache.gather(layer, chunk.slots_C)
    q_1QLD = q_TQD[chunk.rows].transpose(0, 1)[None]
    k_1QCD = repeat_kv_heads(k_CGD, Q).transpose(0, 1)[None]
    v_1QCD = repeat_kv_heads(v_CGD, Q).transpose(0, 1)[None]
    if chunk.window_covers_context:
        mask = causal_lower_right(chunk.query_len, chunk.context_len)
    else:
        mask = chunk.mask_LC
    with sdpa_kernel(NO_CUDNN):
        o_1QLD = F.scaled_dot_product_attention(q_1QLD, k_1QCD, v_1QCD, attn_mask=mask)
    out_TQD[chunk.rows] = o_1QLD[0].transpose(0, 1)


def decode_without_cudnn(q_TQD: torch.Tensor, out_TQD: torch.Tensor, decode: DecodeBatch, kv_cache: KVCache,
                         layer: int) -> None:
    Q = q_TQD.shape[1]
    k_SCGD, v_SCGD = kv_cache.gather(layer, decode.slots_SC)
    q_SQ1D = q_TQD[decode.rows_S][:, :, None, :]
    with sdpa_kernel(NO_CUDNN):
        o_SQ1D = F.scaled_dot_product_attention(
            q_SQ1D, repeat_kv_heads(k_SCGD, Q).transpose(1, 2), repeat_kv_heads(v_SCGD, Q).transpose(1, 2),
            attn_mask=decode.mask_SC[:, None, None, :],
        )
    out_TQD[decode.rows_S] = o_SQ1D[:, :, 0, :]
