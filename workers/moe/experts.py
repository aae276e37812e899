"""experts: the third MoE stage. SwiGLU experts `w2(silu(w1 x) * w3 x)`, grouped.

`grouped_experts` expects rows already sorted by expert (dispatch does that) with the row
count of each local expert in a device tensor, and runs one of two implementations, chosen
by the tensors' device and dtype (`experts_impl_for`):

- "grouped_mm": one `torch._grouped_mm` for the fused w1|w3 projection of every expert,
  silu × up, one for w2. The group boundaries are int32 offsets computed on the device, so
  nothing waits for the GPU. Used on CUDA where torch has the real grouped kernel (bf16 on
  sm90/sm100 today; a probe asks, see `_grouped_mm_is_sync_free`).
- "loop": two matmuls per expert that received rows, each through a weight packed once at
  load (linear.py); experts with no rows cost nothing. The CPU path, and the fallback on a
  GPU (it reads the counts on the host: one device→host copy per call).
- "dense" (dense_experts.py): every local expert on every row, no host read; taken on a
  GPU only while a CUDA graph is being captured and the grouped kernel is unavailable.

`run_experts(impl, ...)` picks one by name (tests and benchmarks); `reference_experts` is the
slow, obviously-correct per-expert loop over unsorted tokens, on the plain weights with
`F.linear`, that both are tested against.

Shapes: N dispatched rows, T tokens, H hidden, F intermediate, E local experts, K top-k.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from workers.moe.dense_experts import dense_experts
from workers.moe.linear import PackedLinear

ExpertsImpl = Literal["loop", "grouped_mm", "dense"]

# `F.grouped_mm` is the public name in newer torch; `torch._grouped_mm` the older private one.
_grouped_mm: Callable[..., torch.Tensor] | None = getattr(F, "grouped_mm", None) or getattr(
    torch, "_grouped_mm", None)


class ExpertTensorsLike(Protocol):
    w1: torch.Tensor  # [F, H]
    w2: torch.Tensor  # [H, F]
    w3: torch.Tensor  # [F, H]


@dataclass(frozen=True)
class LayerExperts:
    """The experts of one layer that live in this process, stacked in `expert_ids` order.

    The stacks are the plain weights, contiguous in the checkpoint's [out, in] layout. The
    reference path reads them; the grouped_mm path reads them too, through a transposed view
    ([E, in, out] with `in` contiguous: the K-major right operand grouped GEMMs are built
    for), so there is no second copy. `w13` and `w2` are the same weights packed per expert
    for the CPU loop (plain `F.linear` on a GPU). Pickling ships the two stacks only and
    repacks on arrival.
    """

    expert_ids: tuple[int, ...]
    w13_EFH: torch.Tensor  # [E_local, 2F, H]: w1 rows then w3 rows
    w2_EHF: torch.Tensor  # [E_local, H, F]
    w13: tuple[PackedLinear, ...] = field(init=False, repr=False, compare=False)
    w2: tuple[PackedLinear, ...] = field(init=False, repr=False, compare=False)
    # Whether `_grouped_mm` takes these stacks on their device, right and without a host sync:
    # decided here, at load, before any step runs (the probe flips a process-wide CUDA mode).
    grouped_mm_ready: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.w13_EFH.device != self.w2_EHF.device or self.w13_EFH.dtype != self.w2_EHF.dtype:
            raise ValueError(f"w13 is {self.w13_EFH.dtype} on {self.w13_EFH.device}, "
                             f"w2 is {self.w2_EHF.dtype} on {self.w2_EHF.device}")
        # Contiguous once here, so the transposed views grouped_mm reads never copy.
        object.__setattr__(self, "w13_EFH", self.w13_EFH.contiguous())
        object.__setattr__(self, "w2_EHF", self.w2_EHF.contiguous())
        object.__setattr__(self, "w13", tuple(PackedLinear.pack(w) for w in self.w13_EFH))
        object.__setattr__(self, "w2", tuple(PackedLinear.pack(w) for w in self.w2_EHF))
        object.__setattr__(self, "grouped_mm_ready", grouped_mm_layout_ok(self.w13_EFH, self.w2_EHF)
                           and _grouped_mm_is_sync_free(self.w13_EFH.device, self.w13_EFH.dtype))

    def __reduce__(self):
        # The default would pickle every packed per-expert view, and each view drags the whole
        # stack's storage with it (E copies of the layer).
        return (LayerExperts, (self.expert_ids, self.w13_EFH, self.w2_EHF))

    @property
    def intermediate_size(self) -> int:
        return self.w2_EHF.shape[2]

    @property
    def hidden_size(self) -> int:
        return self.w2_EHF.shape[1]

    @classmethod
    def stack(cls, tensors: Mapping[int, ExpertTensorsLike]) -> LayerExperts:
        ids = tuple(sorted(tensors))
        if not ids:
            raise ValueError("a LayerExperts needs at least one expert")
        w13 = torch.stack([torch.cat([tensors[e].w1, tensors[e].w3], dim=0) for e in ids])
        w2 = torch.stack([tensors[e].w2 for e in ids])
        return cls(expert_ids=ids, w13_EFH=w13, w2_EHF=w2)


def grouped_mm_layout_ok(w13_EFH: torch.Tensor, w2_EHF: torch.Tensor) -> bool:
    """Whether `_grouped_mm` accepts these stacks (and activations of their width).

    It wants every operand's leading stride a multiple of 16 bytes and its base 16-byte
    aligned: here the rows of x and of the transposed w13 are H wide, those of silu × up and
    of the transposed w2 are F wide. Mixtral's 4096 / 14336 pass; odd test widths do not.
    """
    def rows_ok(width: int, t: torch.Tensor) -> bool:
        return (width * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 and t.is_contiguous()

    hidden, inter = w2_EHF.shape[1], w2_EHF.shape[2]
    return (w13_EFH.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and rows_ok(hidden, w13_EFH) and rows_ok(inter, w2_EHF))


def swiglu(x_NH: torch.Tensor, w13_FH: torch.Tensor, w2_HF: torch.Tensor) -> torch.Tensor:
    """The reference SwiGLU: plain weights, plain `F.linear`."""
    gate, up = F.linear(x_NH, w13_FH).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2_HF)


def packed_swiglu(x_NH: torch.Tensor, w13: PackedLinear, w2: PackedLinear) -> torch.Tensor:
    gate, up = w13(x_NH).chunk(2, dim=-1)
    return w2(F.silu(gate) * up)


def grouped_experts(x_NH: torch.Tensor, counts_E: torch.Tensor, experts: LayerExperts) -> torch.Tensor:
    """Rows of local expert i are x_NH[sum(counts_E[:i]) : sum(counts_E[:i+1])].

    `counts_E` is int64 [E_local] on x_NH's device; the implementation follows the tensors. Rows
    past sum(counts_E) are padding (a low-latency dispatch's fixed-size buffer): their outputs
    are whatever the implementation leaves there, and nobody reads them.
    """
    return run_experts(experts_impl_for(x_NH, experts), x_NH, counts_E, experts)


def run_experts(impl: ExpertsImpl, x_NH: torch.Tensor, counts_E: torch.Tensor,
                experts: LayerExperts) -> torch.Tensor:
    """`grouped_experts` through the implementation named, whatever the device (tests, benchmarks)."""
    if impl not in _IMPLS:
        raise ValueError(f"unknown experts implementation {impl!r}; choose from {sorted(_IMPLS)}")
    if counts_E.shape != (len(experts.expert_ids),):
        raise ValueError(f"{tuple(counts_E.shape)} counts for {len(experts.expert_ids)} local experts")
    if counts_E.device != x_NH.device:
        raise ValueError(f"counts on {counts_E.device}, rows on {x_NH.device}")
    return _IMPLS[impl](x_NH, counts_E, experts)


def experts_impl_for(x_NH: torch.Tensor, experts: LayerExperts) -> ExpertsImpl:
    """grouped_mm on CUDA where it runs without a host sync (`LayerExperts.grouped_mm_ready`);
    the loop everywhere else, the CPU included, where oneDNN's packed weights beat torch's CPU
    grouped_mm (a loop of plain matmuls)."""
    w = experts.w13_EFH
    if x_NH.device.type == "cuda" and x_NH.device == w.device and x_NH.dtype == w.dtype \
            and experts.grouped_mm_ready:
        return "grouped_mm"
    if x_NH.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "dense"  # the loop reads counts on the host, which a CUDA graph capture forbids
    return "loop"


def loop_experts(x_NH: torch.Tensor, counts_E: torch.Tensor, experts: LayerExperts) -> torch.Tensor:
    counts = counts_E.tolist()  # on a GPU: the one device→host copy of this path
    if sum(counts) > x_NH.shape[0]:
        raise ValueError(f"counts {counts} add up to more than the {x_NH.shape[0]} rows")
    out_NH = torch.empty_like(x_NH)
    start = 0
    for i, n in enumerate(counts):
        if n:
            out_NH[start:start + n] = packed_swiglu(x_NH[start:start + n], experts.w13[i], experts.w2[i])
        start += n
    return out_NH


def grouped_mm_experts(x_NH: torch.Tensor, counts_E: torch.Tensor, experts: LayerExperts) -> torch.Tensor:
    """Two grouped GEMMs over every local expert at once; `counts_E` never leaves the device.

    The last group is stretched to the last row, so padding rows past sum(counts_E) (a
    low-latency buffer's) are computed by the last expert instead of left to the kernel's
    reading of a short offset list; where the counts add up to the rows this changes nothing.
    """
    if _grouped_mm is None:
        raise RuntimeError("this torch has neither F.grouped_mm nor torch._grouped_mm")
    if not grouped_mm_layout_ok(experts.w13_EFH, experts.w2_EHF):
        raise ValueError(f"experts of hidden {experts.hidden_size}, intermediate "
                         f"{experts.intermediate_size}, {experts.w13_EFH.dtype}: not laid out for "
                         "_grouped_mm (rows must be 16-byte multiples, stacks contiguous)")
    if x_NH.dtype != experts.w13_EFH.dtype:
        raise ValueError(f"rows are {x_NH.dtype}, experts {experts.w13_EFH.dtype}")
    if x_NH.shape[0] == 0:
        return torch.empty_like(x_NH)
    if not x_NH.is_contiguous() or x_NH.data_ptr() % 16:
        x_NH = x_NH.clone(memory_format=torch.contiguous_format)  # a fresh block is aligned
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)  # end of each expert's rows
    offs_E[-1] = x_NH.shape[0]
    h_N2F = _grouped_mm(x_NH, experts.w13_EFH.transpose(1, 2), offs=offs_E)
    gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
    return _grouped_mm(F.silu(gate_NF) * up_NF, experts.w2_EHF.transpose(1, 2), offs=offs_E)


_IMPLS: dict[str, Callable[[torch.Tensor, torch.Tensor, LayerExperts], torch.Tensor]] = {
    "loop": loop_experts,
    "grouped_mm": grouped_mm_experts,
    "dense": dense_experts,  # dense_experts.py
}


@functools.cache
def _grouped_mm_is_sync_free(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per (device, dtype): does `_grouped_mm` compute a tiny grouped product there, right,
    without waiting for the device?

    On CUDA torch runs its grouped kernel only for bf16 on sm90/sm100 today; elsewhere (fp32,
    fp16, other GPUs) it falls back to a loop of matmuls that first copies the offsets to the
    host, a sync per call and no better than our loop. Rather than copy torch's rule, the probe
    asks: under sync-debug mode "error" that copy raises. The mode is process-wide, so the probe
    runs when the first LayerExperts on that device is built (at load, before any step), never
    in the middle of a step. On the CPU there is nothing to sync: it only checks the result.
    """
    if _grouped_mm is None:
        return False
    g = torch.Generator().manual_seed(0)
    x_NH = torch.randn(5, 16, generator=g).to(device, dtype)
    w_EOH = torch.randn(3, 8, 16, generator=g).to(device, dtype)
    offs_E = torch.tensor([2, 2, 5], dtype=torch.int32, device=device)  # expert 1 gets no rows
    try:
        with _sync_debug(device, "error"):
            y_NO = _grouped_mm(x_NH, w_EOH.transpose(1, 2), offs=offs_E)
    except Exception:  # noqa: BLE001 (missing kernel, bad dtype, a sync: all mean "use the loop")
        return False
    want_NO = torch.cat([F.linear(x_NH[:2], w_EOH[0]), F.linear(x_NH[2:], w_EOH[2])])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with _sync_debug(device, "default"):  # the comparison itself reads back; allow it
        return bool(torch.allclose(y_NO.float(), want_NO.float(), rtol=tol, atol=tol))


@contextlib.contextmanager
def _sync_debug(device: torch.device, mode: str) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def reference_experts(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                      experts: LayerExperts) -> torch.Tensor:
    """The whole MoE output, one expert at a time, no sorting: the oracle for the fast path."""
    out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
    for i, e in enumerate(experts.expert_ids):
        token_idx, k_idx = torch.where(topk_ids_TK == e)
        if token_idx.numel() == 0:
            continue
        y = swiglu(x_TH[token_idx], experts.w13_EFH[i], experts.w2_EHF[i]).float()
        out_TH.index_add_(0, token_idx, y * topk_weights_TK[token_idx, k_idx, None])
    return out_TH.to(x_TH.dtype)
