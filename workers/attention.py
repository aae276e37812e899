"""Grouped-query attention over the paged KV cache, for a mixed prefill/decode batch.

Shapes: T tokens in the step, H hidden, Q query heads, G key/value heads, D head dim,
S sequences, C context length (keys visible to a query).

Decode tokens of all sequences are attended in one padded batch; prefill chunks run one
sequence at a time (their query blocks differ in length, and a chunk is large enough
that the per-sequence call is not the bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.attention_metadata import AttentionMetadata
from workers.kv_cache import KVCache
from workers.rope import apply_rope


@dataclass(frozen=True)
class AttentionWeights:
    wq: torch.Tensor  # [Q*D, H]
    wk: torch.Tensor  # [G*D, H]
    wv: torch.Tensor  # [G*D, H]
    wo: torch.Tensor  # [H, Q*D]


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """True where a query at q_pos may attend a key at k_pos (causal, and inside the window).

    HF's Mixtral window lets a token see itself and the `sliding_window - 1` before it.
    """
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


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
    decode_rows = [i for i, e in enumerate(meta.extents) if e.query_len == 1]
    if decode_rows:
        _attend_decode(q_TQD, out_TQD, decode_rows, layer, meta, kv_cache, sliding_window)
    for i, ext in enumerate(meta.extents):
        if ext.query_len > 1:
            _attend_prefill(q_TQD, out_TQD, i, layer, meta, kv_cache, sliding_window)
    return F.linear(out_TQD.reshape(T, num_heads * head_dim), w.wo)


def _context_slots(block_table: tuple[int, ...], context_len: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(context_len)
    blocks = torch.tensor(block_table, dtype=torch.long)[pos // block_size]
    return blocks * block_size + pos % block_size


def _attend_prefill(q_TQD, out_TQD, i, layer, meta, kv_cache, sliding_window) -> None:
    ext, start = meta.extents[i], meta.query_starts[i]
    rows = slice(start, start + ext.query_len)
    k_CGD, v_CGD = kv_cache.gather(layer, _context_slots(ext.block_table, ext.context_len, meta.block_size))
    mask = visible_mask(meta.positions_T[rows], torch.arange(ext.context_len), sliding_window)
    o = F.scaled_dot_product_attention(
        q_TQD[rows].transpose(0, 1), k_CGD.transpose(0, 1), v_CGD.transpose(0, 1),
        attn_mask=mask, enable_gqa=True,
    )
    out_TQD[rows] = o.transpose(0, 1)


def _attend_decode(q_TQD, out_TQD, decode_rows, layer, meta, kv_cache, sliding_window) -> None:
    exts = [meta.extents[i] for i in decode_rows]
    rows = torch.tensor([meta.query_starts[i] for i in decode_rows], dtype=torch.long)
    max_ctx = max(e.context_len for e in exts)
    # Pad every context to the longest; padded keys point at slot 0 and are masked out.
    slots_SC = torch.zeros(len(exts), max_ctx, dtype=torch.long)
    for s, e in enumerate(exts):
        slots_SC[s, : e.context_len] = _context_slots(e.block_table, e.context_len, meta.block_size)
    k_SCGD, v_SCGD = kv_cache.gather(layer, slots_SC)
    ctx_S = torch.tensor([e.context_len for e in exts])
    k_pos = torch.arange(max_ctx)
    mask_SC = visible_mask(ctx_S[:, None] - 1, k_pos[None, :].expand(len(exts), -1), sliding_window)[:, 0, :]
    mask_SC &= k_pos[None, :] < ctx_S[:, None]
    q_SQ1D = q_TQD[rows][:, :, None, :]
    o_SQ1D = F.scaled_dot_product_attention(
        q_SQ1D, k_SCGD.transpose(1, 2), v_SCGD.transpose(1, 2),
        attn_mask=mask_SC[:, None, None, :], enable_gqa=True,
    )
    out_TQD[rows] = o_SQ1D[:, :, 0, :]
