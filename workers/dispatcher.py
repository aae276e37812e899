"""dispatch and combine: the MoE stages around `experts`, behind one interface.

Every MoE layer runs, on every rank, in this order:
    routing = route(x, gate)                         (router.py)
    x_M, plan = dispatcher.dispatch(layer, x, routing)
    y_M = dispatcher.experts(layer, x_M, plan)
    y = dispatcher.combine(layer, y_M, plan)
The local dispatcher keeps every expert in-process; the distributed one moves rows with
an all-to-all. Model code only ever sees this interface.

Shapes: T tokens, H hidden, K top-k, N rows sent, M rows received.
"""

from __future__ import annotations

from typing import Protocol

import torch

from workers.dispatch_plan import DispatchPlan
from workers.experts import LayerExperts, grouped_experts
from workers.router import Routing, count_per_expert


class Dispatcher(Protocol):
    def dispatch(
        self, layer: int, x_TH: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, DispatchPlan]: ...

    def experts(self, layer: int, x_MH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor: ...

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


def weighted_sum(y_NH: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """combine's arithmetic: out[t] = Σ over t's rows of weight × expert output, in fp32."""
    out_TH = torch.zeros(plan.num_tokens, y_NH.shape[1], dtype=torch.float32, device=y_NH.device)
    out_TH.index_add_(0, plan.token_idx_N, y_NH.float() * plan.weights_N[:, None])
    return out_TH.to(out_dtype)


class LocalDispatcher:
    """All experts of every layer live in this process; dispatch is a sort, combine a sum.

    No stage reads anything back from the device (row counts stay a tensor, the sizes it
    needs are shapes), so a GPU step runs its MoE layers without waiting on them.
    """

    def __init__(self, experts_by_layer: dict[int, LayerExperts]) -> None:
        for layer, ex in experts_by_layer.items():
            if ex.expert_ids != tuple(range(len(ex.expert_ids))):
                raise ValueError(
                    f"layer {layer}: the local dispatcher needs every expert, got {ex.expert_ids}")
        self.experts_by_layer = experts_by_layer

    def dispatch(self, layer: int, x_TH: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, DispatchPlan]:
        num_experts = len(self.experts_by_layer[layer].expert_ids)
        token_idx, weights, counts = sort_by_expert(routing, num_experts)
        n = int(token_idx.numel())  # T·K: a shape, known on the host
        plan = DispatchPlan(
            num_tokens=x_TH.shape[0], token_idx_N=token_idx, weights_N=weights,
            send_counts=(n,), recv_counts=(n,), expert_counts_E=counts,
        )
        return x_TH[token_idx], plan

    def experts(self, layer: int, x_MH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return grouped_experts(x_MH, plan.expert_counts_E, self.experts_by_layer[layer])

    def combine(self, layer: int, y_MH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return weighted_sum(y_MH, plan, y_MH.dtype)
