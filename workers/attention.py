"""Grouped-query attention over the paged KV cache, for a mixed prefill/decode batch.

Shapes: T tokens in the step, H hidden, Q query heads, G key/value heads, D head dim,
S sequences, C context length (keys visible to a query).

Decode tokens of all sequences are attended in one padded batch; prefill chunks run one
sequence at a time (their query blocks differ in length, and a chunk is large enough
that the per-sequence call is not the bottleneck). Which cache slots each query reads and
which keys it may see come from the step's metadata, built once and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention_metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from workers.kv_cache import KVCache
from workers.rope import apply_rope


@dataclass(frozen=True)
class AttentionWeights:
    wq: torch.Tensor  # [Q*D, H]
    wk: torch.Tensor  # [G*D, H]
    wv: torch.Tensor  # [G*D, H]
    wo: torch.Tensor  # [H, Q*D]


def attention(
    x_TH: torch.Tensor,
    w: AttentionWeights,
    layer: int,
    meta: AttentionMetadata,
    kv_cache: KVCache,
    rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sliding_window: int | None,
) -> torch.Tensor:
    T = x_TH.shape[0]
    q_TQD = F.linear(x_TH, w.wq).view(T, num_heads, head_dim)
    k_TGD = F.linear(x_TH, w.wk).view(T, num_kv_heads, head_dim)
    v_TGD = F.linear(x_TH, w.wv).view(T, num_kv_heads, head_dim)
    cos, sin = rope_cos_sin
    q_TQD, k_TGD = apply_rope(q_TQD, cos, sin), apply_rope(k_TGD, cos, sin)
    kv_cache.write(layer, meta.slot_mapping_T, k_TGD, v_TGD)

    out_TQD = torch.empty_like(q_TQD)
    decode = meta.decode_batch(sliding_window)
    if decode is not None:
        _attend_decode(q_TQD, out_TQD, decode, kv_cache, layer)
    for chunk in meta.prefill_chunks(sliding_window):
        _attend_prefill(q_TQD, out_TQD, chunk, kv_cache, layer)
    return F.linear(out_TQD.reshape(T, num_heads * head_dim), w.wo)


def _attend_prefill(q_TQD: torch.Tensor, out_TQD: torch.Tensor, chunk: PrefillChunk, kv_cache: KVCache,
                    layer: int) -> None:
    k_CGD, v_CGD = kv_cache.gather(layer, chunk.slots_C)
    o = F.scaled_dot_product_attention(
        q_TQD[chunk.rows].transpose(0, 1), k_CGD.transpose(0, 1), v_CGD.transpose(0, 1),
        attn_mask=chunk.mask_LC, enable_gqa=True,
    )
    out_TQD[chunk.rows] = o.transpose(0, 1)


def _attend_decode(q_TQD: torch.Tensor, out_TQD: torch.Tensor, decode: DecodeBatch, kv_cache: KVCache,
                   layer: int) -> None:
    k_SCGD, v_SCGD = kv_cache.gather(layer, decode.slots_SC)
    q_SQ1D = q_TQD[decode.rows_S][:, :, None, :]
    o_SQ1D = F.scaled_dot_product_attention(
        q_SQ1D, k_SCGD.transpose(1, 2), v_SCGD.transpose(1, 2),
        attn_mask=decode.mask_SC[:, None, None, :], enable_gqa=True,
    )
    out_TQD[decode.rows_S] = o_SQ1D[:, :, 0, :]
