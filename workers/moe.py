"""The sparse MoE block: route → dispatch → experts → combine."""

from __future__ import annotations

import torch

from workers.dispatcher import Dispatcher
from workers.router import route


def moe_block(layer: int, x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int,
              dispatcher: Dispatcher) -> torch.Tensor:
    routing = route(x_TH, gate_EH, top_k)
    x_MH, plan = dispatcher.dispatch(layer, x_TH, routing)
    y_MH = dispatcher.experts(layer, x_MH, plan)
    return dispatcher.combine(layer, y_MH, plan)
