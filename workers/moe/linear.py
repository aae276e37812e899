"""PackedLinear: `F.linear(x, weight)` with the weight reordered once, at load time, for oneDNN.

Why: a decode step hands each expert only a few rows, so an expert matmul is a weight-
streaming problem. MKL's `F.linear` on 2–8 rows reads a plain [out, in] weight at ~7 GB/s;
oneDNN reading a weight already reordered into its blocked layout reaches 14–31 GB/s. The
ops are private (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`, what
Inductor emits when it freezes a CPU graph), so they are feature-detected and everything
falls back to `F.linear`, which stays the reference.

When the plain `F.linear` runs instead:
- always, for a weight that was not packed: not on the CPU (CUDA has its own good GEMMs),
  not fp32/bf16, fewer than `MIN_PACKED_NUMEL` elements (oneDNN's fixed per-call cost beats
  its bandwidth win on the demo model's matrices), the ops missing or failing a probe, or
  packing disabled with MOE_SERVE_PACKED_LINEAR=0;
- for an input of fewer than two rows: MKL's matrix-vector kernel already streams a weight
  well, and that is every matmul of a concurrency-1 decode step.

The packed copy is a snapshot: writing into the plain weight afterwards does not reach it
(weights are immutable after load here). It costs the weight's size again in memory; the
plain weight is kept for the reference paths and for the fallbacks above.

Shapes: N rows, I in-features, O out-features.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

ENV_VAR = "MOE_SERVE_PACKED_LINEAR"
MIN_PACKED_NUMEL = 1 << 18  # 1024×256: the smallest weight that measured faster packed at 2–16 rows
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def packing_enabled() -> bool:
    """Read when a weight is packed (not at import), so a test or bench can flip it."""
    return os.environ.get(ENV_VAR, "1") != "0"


class PackedLinear:
    """`self(x_NI) == F.linear(x_NI, weight_OI)`, through a pre-packed oneDNN weight when there is one."""

    __slots__ = ("weight_OI", "packed_OI")

    def __init__(self, weight_OI: torch.Tensor, packed_OI: torch.Tensor | None = None) -> None:
        self.weight_OI = weight_OI
        self.packed_OI = packed_OI  # an opaque mkldnn tensor, or None: plain F.linear

    @classmethod
    def pack(cls, weight_OI: torch.Tensor, min_numel: int = MIN_PACKED_NUMEL) -> PackedLinear:
        if not (packing_enabled() and _worth_packing(weight_OI, min_numel) and _ops_work(weight_OI.dtype)):
            return cls(weight_OI)
        try:
            return cls(weight_OI, torch.ops.mkldnn._reorder_linear_weight(weight_OI.detach().contiguous()))
        except RuntimeError:
            return cls(weight_OI)

    @property
    def is_packed(self) -> bool:
        return self.packed_OI is not None

    def __call__(self, x_NI: torch.Tensor) -> torch.Tensor:
        if self.packed_OI is None or x_NI.numel() < 2 * x_NI.shape[-1] or x_NI.dtype != self.weight_OI.dtype:
            return F.linear(x_NI, self.weight_OI)
        return torch.ops.mkldnn._linear_pointwise(x_NI, self.packed_OI, None, "none", [], "")

    def __reduce__(self):
        # An opaque mkldnn tensor cannot be pickled; ship the plain weight and pack again on
        # arrival, under the receiving process's own settings.
        return (PackedLinear.pack, (self.weight_OI,))

    def __repr__(self) -> str:
        kind = "packed" if self.is_packed else "plain"
        return f"PackedLinear({tuple(self.weight_OI.shape)}, {self.weight_OI.dtype}, {kind})"


def _worth_packing(weight_OI: torch.Tensor, min_numel: int) -> bool:
    return (weight_OI.device.type == "cpu" and weight_OI.dim() == 2 and weight_OI.dtype in PACKABLE_DTYPES
            and weight_OI.numel() >= min_numel and not weight_OI.requires_grad)


@functools.cache
def _ops_work(dtype: torch.dtype) -> bool:
    """Whether this torch build has the private ops and they compute a linear, once per dtype."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(24, 40, generator=g).to(dtype)
        x = torch.randn(3, 40, generator=g).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return bool(torch.allclose(y.float(), F.linear(x, w).float(), rtol=tol, atol=tol))
