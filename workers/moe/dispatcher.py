"""dispatch and combine: the MoE stages around `experts`, behind one interface.

Every MoE layer runs, on every rank, in this order (moe.py composes them):
    routing = route(x, gate)                          router.py
    x_M, plan = dispatcher.dispatch(layer, x, routing)
    y_M = experts_stage(x_M, plan, experts)           moe.py, over the expert weights it is given
    y = dispatcher.combine(layer, y_M, plan)
A dispatcher only moves rows: the local one sorts them by expert in-process, the distributed
one sends them to the ranks holding their experts with an all-to-all. Neither holds expert
weights. Model code only ever sees this interface.

Shapes: T tokens, H hidden, K top-k, N rows sent, M rows received.
"""

from __future__ import annotations

from typing import Protocol

import torch

from workers.moe.combine import weighted_sum
from workers.moe.dispatch_plan import DispatchPlan
from workers.moe.route import Routing, count_per_expert


class Dispatcher(Protocol):
    def dispatch(
        self, layer: int, x_TH: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, DispatchPlan]: ...

    def combine(self, layer: int, y_MH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor: ...


def sort_by_expert(routing: Routing, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the T×K assignments by expert id (stable, so token order is kept per expert).

    Returns (token_idx_N, weights_N, counts_E), all on the routing's device, with no host sync.
    """
    flat_ids = routing.topk_ids_TK.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_idx = order // routing.top_k
    weights = routing.topk_weights_TK.reshape(-1)[order]
    return token_idx, weights, count_per_expert(flat_ids, num_experts)


class LocalDispatcher:
    """Every expert is in this process: dispatch is a sort by expert, combine a weighted sum.

    No stage reads anything back from the device (row counts stay a tensor, the sizes it
    needs are shapes), so a GPU step runs its MoE layers without waiting on them.
    """

    def __init__(self, num_experts: int) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts

    def dispatch(self, layer: int, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, DispatchPlan]:
        token_idx, weights, counts = sort_by_expert(routing, self.num_experts)
        n = int(token_idx.numel())  # T·K: a shape, known on the host
        plan = DispatchPlan(
            num_tokens=x_TH.shape[0], token_idx_N=token_idx, weights_N=weights,
            send_counts=(n,), recv_counts=(n,), expert_counts_E=counts,
        )
        return x_TH[token_idx], plan

    def combine(self, layer: int, y_MH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return weighted_sum(y_MH, plan, y_MH.dtype)
