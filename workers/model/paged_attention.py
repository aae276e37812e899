"""Paged decode attention in Triton: one query token per sequence, keys read through the block table.

Shapes: T tokens in the step, Q query heads, G key/value heads, D head dim, S decode
sequences, B blocks of a block table, N (cache) blocks, P block size.

Why a kernel of our own: the plain path gathers every sequence's keys into a padded
[S, C, G, D] copy and builds a dense [S, C] mask, and SDPA with an explicit mask is sent to
cuDNN, which built a new plan on every call on an H200 (23 ms of host time per call). This
kernel reads K/V in place, computes which keys are visible from the context length and the
window, and has a fixed launch shape (S, G) with every per-step value read from device
tensors: no host sync, so a CUDA graph can capture it (warm it up once first: the first call
compiles).

One program per (sequence, key/value head) serves all Q/G query heads that share the head
(GQA), so each key is loaded once per group. It walks the visible keys in tiles with an
online softmax in fp32 (running max, running sum, rescaled accumulator). Keys and values are
widened to fp32 as they are loaded and the dots run on fp32 operands: TF32 for half-precision
caches, which holds a bf16 or fp16 value exactly (and the softmax weights p more finely than a
cast back to bf16 would), IEEE for fp32 caches, the accuracy reference. Decode is bound by
reading the cache, not by the dots, so the wider operands cost nothing that shows; and
Triton's interpreter, which the CPU tests run, multiplies bf16 as raw integers in tl.dot. HF Mixtral's window:
a token sees itself and the sliding_window - 1 before it, so a query at position ctx-1 reads
keys from max(0, ctx - sliding_window).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# tl.dot needs every side ≥ 16: the query-head group and the key tile are padded up to it.
_MIN_DOT = 16
_KEY_TILE = 32
_NO_WINDOW = 2**31 - 1  # an int32 wider than any context: the window cuts nothing


@triton.jit
def _paged_decode_kernel(
    q_ptr, out_ptr, rows_ptr, k_ptr, v_ptr, tables_ptr, context_lens_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kn, stride_kp, stride_kg, stride_vn, stride_vp, stride_vg,
    stride_tables,
    qk_scale_log2, sliding_window,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, KEY_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(rows_ptr + seq)
    context_len = tl.load(context_lens_ptr + seq)

    offs_h = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, KEY_TILE)
    head_ok = offs_h < GROUP
    dim_ok = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h  # HF's repeat_kv order: query head h reads key head h // GROUP

    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    first = tl.maximum(context_len - sliding_window, 0)
    for start in range(first, context_len, KEY_TILE):
        pos = start + offs_n
        key_ok = pos < context_len
        block = tl.load(tables_ptr + seq * stride_tables + pos // BLOCK_SIZE, mask=key_ok, other=0)
        block = block.to(tl.int64)  # a large cache's offsets overflow int32
        in_block = pos % BLOCK_SIZE
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kn + in_block[:, None] * stride_kp
                    + kv_head * stride_kg + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        # [GROUP_PAD, KEY_TILE], in log2 units: exp2 is the cheap exponential.
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        # Every tile holds at least one visible key (start < context_len), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + block[:, None] * stride_vn + in_block[:, None] * stride_vp
                    + kv_head * stride_vg + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    # A row with no keys (context length 0: padding of a batch captured at a fixed size) has
    # l_i == 0 and gets zeros, not NaN.
    out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


def paged_decode_attention(
    q_TQD: torch.Tensor,
    out_TQD: torch.Tensor,
    rows_S: torch.Tensor,
    k_NPGD: torch.Tensor,
    v_NPGD: torch.Tensor,
    block_tables_SB: torch.Tensor,
    context_lens_S: torch.Tensor,
    sliding_window: int | None,
) -> None:
    """Write attention of the decode rows `rows_S` of q_TQD into the same rows of out_TQD.

    block_tables_SB (int32 [S, B]) maps a sequence's position p to cache block
    block_tables_SB[s, p // P]; context_lens_S (int32 [S]) counts its keys, the new token's
    own included (it must already be written to the cache); a length of 0 writes zeros, so a
    batch padded to a captured size can point its padding at a scratch row. Rows not in rows_S
    are untouched.
    """
    S = rows_S.shape[0]
    if S == 0:
        return
    _, P, G, D = k_NPGD.shape
    Q = q_TQD.shape[1]
    named = (("q", q_TQD), ("out", out_TQD), ("k", k_NPGD), ("v", v_NPGD), ("tables", block_tables_SB))
    for name, t in named:
        if t.stride(-1) != 1:
            raise ValueError(f"paged_decode_attention: {name} must be contiguous in its last dim")
    group = Q // G
    fp32 = k_NPGD.dtype == torch.float32
    _paged_decode_kernel[(S, G)](
        q_TQD, out_TQD, rows_S, k_NPGD, v_NPGD, block_tables_SB, context_lens_S,
        q_TQD.stride(0), q_TQD.stride(1), out_TQD.stride(0), out_TQD.stride(1),
        k_NPGD.stride(0), k_NPGD.stride(1), k_NPGD.stride(2),
        v_NPGD.stride(0), v_NPGD.stride(1), v_NPGD.stride(2),
        block_tables_SB.stride(0),
        math.log2(math.e) / math.sqrt(D),
        _NO_WINDOW if sliding_window is None else sliding_window,
        HEAD_DIM=D, BLOCK_SIZE=P, GROUP=group,
        GROUP_PAD=max(_MIN_DOT, triton.next_power_of_2(group)),
        HEAD_DIM_PAD=max(_MIN_DOT, triton.next_power_of_2(D)),
        KEY_TILE=_KEY_TILE,
        DOT_PRECISION="ieee" if fp32 else "tf32",
    )
