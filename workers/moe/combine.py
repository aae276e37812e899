"""combine's arithmetic, shared by every dispatcher: each token's expert outputs, weighted and summed.

Shapes: T tokens, N rows (token × chosen expert), H hidden.
"""

from __future__ import annotations

import torch

from workers.moe.dispatch_plan import DispatchPlan


def weighted_sum(y_NH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = Σ over t's rows of weight × expert output, accumulated in fp32."""
    out_TH = torch.zeros(plan.num_tokens, y_NH.shape[1], dtype=torch.float32, device=y_NH.device)
    out_TH.index_add_(0, plan.token_idx_N, y_NH.float() * plan.weights_N[:, None])
    return out_TH.to(out_dtype)
