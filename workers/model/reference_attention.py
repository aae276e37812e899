"""The plain PyTorch attention path: the CPU implementation and the oracle for the GPU kernels.

Shapes: T tokens in the step, Q query heads, G key/value heads, D head dim, S decode
sequences, C context length (keys visible to a query), L query length of a prefill chunk.

Decode tokens of all sequences are attended in one padded batch; prefill chunks run one
sequence at a time (their query blocks differ in length, and a chunk is large enough that
the per-sequence call is not the bottleneck). Keys are gathered out of the paged cache and
a dense boolean mask says which each query may see: simple enough to trust, which is what
an oracle needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.model.attention_metadata import DecodeBatch, PrefillChunk
from workers.model.kv_cache import KVCache


def prefill_reference(q_TQD: torch.Tensor, out_TQD: torch.Tensor, chunk: PrefillChunk, kv_cache: KVCache,
                      layer: int) -> None:
    k_CGD, v_CGD = kv_cache.gather(layer, chunk.slots_C)
    o_QLD = F.scaled_dot_product_attention(
        q_TQD[chunk.rows].transpose(0, 1), k_CGD.transpose(0, 1), v_CGD.transpose(0, 1),
        attn_mask=chunk.mask_LC, enable_gqa=True,
    )
    out_TQD[chunk.rows] = o_QLD.transpose(0, 1)


def decode_reference(q_TQD: torch.Tensor, out_TQD: torch.Tensor, decode: DecodeBatch, kv_cache: KVCache,
                     layer: int) -> None:
    k_SCGD, v_SCGD = kv_cache.gather(layer, decode.slots_SC)
    q_SQ1D = q_TQD[decode.rows_S][:, :, None, :]
    o_SQ1D = F.scaled_dot_product_attention(
        q_SQ1D, k_SCGD.transpose(1, 2), v_SCGD.transpose(1, 2),
        attn_mask=decode.mask_SC[:, None, None, :], enable_gqa=True,
    )
    out_TQD[decode.rows_S] = o_SQ1D[:, :, 0, :]
