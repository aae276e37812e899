"""The sparse MoE block: route → dispatch → experts → combine.

The block composes the four stages over the expert weights it is given: the dispatcher only
moves rows, `experts_stage` computes on the rows this rank received. An attention rank of a
model group holds no experts (`experts` is None) and receives no rows; an expert worker runs
the same three last stages on the rows others sent it (workers/group/expert_worker.py).

Shapes: T tokens, H hidden, E experts, K top-k, M rows received.
"""

from __future__ import annotations

import torch

from workers.moe.dispatch_plan import DispatchPlan
from workers.moe.dispatcher import Dispatcher
from workers.moe.experts import LayerExperts, grouped_experts
from workers.moe.route import route


def experts_stage(x_MH: torch.Tensor, plan: DispatchPlan, experts: LayerExperts | None) -> torch.Tensor:
    """experts: the third stage, on the rows dispatch delivered, grouped by local expert."""
    if experts is None:
        if x_MH.shape[0]:
            raise RuntimeError(f"{x_MH.shape[0]} rows were dispatched to a rank that holds no experts")
        return torch.empty_like(x_MH)
    return grouped_experts(x_MH, plan.expert_counts_E, experts)


def moe_block(layer: int, x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int, dispatcher: Dispatcher,
              experts: LayerExperts | None) -> torch.Tensor:
    routing = route(x_TH, gate_EH, top_k)
    x_MH, plan = dispatcher.dispatch(layer, x_TH, routing)
    y_MH = experts_stage(x_MH, plan, experts)
    return dispatcher.combine(layer, y_MH, plan)
