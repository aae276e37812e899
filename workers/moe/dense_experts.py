"""A capture-safe experts stage for GPUs where the grouped kernel does not run.

Why: inside a CUDA graph nothing may wait for the device, and the per-expert loop
(experts.py, "loop") reads each expert's row count on the host to slice its rows; torch's
grouped_mm outside bf16 on sm90/sm100 does the same internally. So while a graph is being
captured and the grouped kernel is unavailable (fp32, fp16, other GPUs), the experts stage
runs "dense": every local expert on every row as two batched matmuls, each row then keeping
the output of the expert whose rows it sits among. Shapes are fixed by the row count, every
index is computed on the device. It costs E_local times the routed work and an [E, N, 2F]
intermediate, which a decode step's few rows afford; an eager step never takes it.

Shapes: N dispatched rows (sorted by expert), H hidden, F intermediate, E local experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from workers.moe.experts import LayerExperts


def dense_experts(x_NH: torch.Tensor, counts_E: torch.Tensor, experts: LayerExperts) -> torch.Tensor:
    """Rows of local expert i are x_NH[sum(counts_E[:i]) : sum(counts_E[:i+1])]; rows past
    sum(counts_E) (padding) take the last expert, as the grouped_mm path does."""
    N, E = x_NH.shape[0], counts_E.shape[0]
    if N == 0:
        return torch.empty_like(x_NH)
    ends_E = torch.cumsum(counts_E, 0)
    row_N = torch.arange(N, device=x_NH.device)
    expert_N = torch.searchsorted(ends_E, row_N, right=True).clamp_(max=E - 1)
    h_EN2F = torch.matmul(x_NH, experts.w13_EFH.transpose(1, 2))
    gate_ENF, up_ENF = h_EN2F.chunk(2, dim=-1)
    y_ENH = torch.matmul(F.silu(gate_ENF) * up_ENF, experts.w2_EHF.transpose(1, 2))
    return y_ENH[expert_N, row_N]
