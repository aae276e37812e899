"""Grouped-query attention over the paged KV cache, for a mixed prefill/decode batch.

Shapes: T tokens in the step, H hidden, Q query heads, G key/value heads, D head dim.

One function for every device: project, rotate, write the new keys and values to the cache,
then attend the step's decode tokens as one batch and its prefill chunks one at a time.
Which kernels attend is chosen by the tensors' device (and, on a GPU, whether Triton loads):

- CPU: the plain path (reference_attention.py): keys gathered into a padded batch, a dense
  boolean mask, SDPA. It is also the oracle every GPU kernel is tested against.
- CUDA: decode through the Triton paged kernel (paged_attention.py), which reads keys through
  the block table with no gather and no mask and has a fixed launch shape, so a CUDA graph can
  capture it. Prefill through SDPA with a lower-right causal bias and cuDNN excluded
  (cuda_sdpa_attention.py). The plain path on a GPU is what we must avoid: SDPA with an
  explicit mask goes to cuDNN, which built a new plan on every call on an H200 (23 ms of host
  time per call, 48 ms per 2-layer decode step at every batch size).
- CUDA without Triton: decode through the plain padded batch with cuDNN excluded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.model.attention_metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from workers.model.cuda_sdpa_attention import decode_without_cudnn, prefill_without_cudnn
from workers.model.kv_cache import KVCache
from workers.model.reference_attention import decode_reference, prefill_reference
from workers.model.rope import apply_rope

DecodeKernel = Callable[[torch.Tensor, torch.Tensor, DecodeBatch, KVCache, int], None]
PrefillKernel = Callable[[torch.Tensor, torch.Tensor, PrefillChunk, KVCache, int], None]


@dataclass(frozen=True)
class AttentionWeights:
    wq: torch.Tensor  # [Q*D, H]
    wk: torch.Tensor  # [G*D, H]
    wv: torch.Tensor  # [G*D, H]
    wo: torch.Tensor  # [H, Q*D]


@dataclass(frozen=True)
class AttentionKernels:
    """The pair of kernels one device runs; each writes its rows of out_TQD."""

    name: str
    decode: DecodeKernel
    prefill: PrefillKernel


def triton_decode(q_TQD: torch.Tensor, out_TQD: torch.Tensor, decode: DecodeBatch, kv_cache: KVCache,
                  layer: int) -> None:
    from workers.model.paged_attention import paged_decode_attention

    paged_decode_attention(q_TQD, out_TQD, decode.rows_S, kv_cache.k_BPGD[layer], kv_cache.v_BPGD[layer],
                           decode.block_tables_SB, decode.context_lens_S, decode.sliding_window)


REFERENCE = AttentionKernels("reference", decode_reference, prefill_reference)
CUDA_TRITON = AttentionKernels("cuda-triton", triton_decode, prefill_without_cudnn)
CUDA_SDPA = AttentionKernels("cuda-sdpa", decode_without_cudnn, prefill_without_cudnn)


def select_kernels(device_type: str, triton_available: bool) -> AttentionKernels:
    """The kernels for tensors on `device_type`: the plain path everywhere but CUDA."""
    if device_type != "cuda":
        return REFERENCE
    return CUDA_TRITON if triton_available else CUDA_SDPA


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernel module loads; asked once per process."""
    try:
        import workers.model.paged_attention  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_for(device: torch.device) -> AttentionKernels:
    # Only a CUDA tensor makes us ask about Triton: a CPU process never imports it.
    return select_kernels(device.type, device.type == "cuda" and triton_available())


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

    kernels = kernels_for(q_TQD.device)
    out_TQD = torch.empty_like(q_TQD)
    decode = meta.decode_batch(sliding_window)
    if decode is not None:
        kernels.decode(q_TQD, out_TQD, decode, kv_cache, layer)
    for chunk in meta.prefill_chunks(sliding_window):
        kernels.prefill(q_TQD, out_TQD, chunk, kv_cache, layer)
    return F.linear(out_TQD.reshape(T, num_heads * head_dim), w.wo)
