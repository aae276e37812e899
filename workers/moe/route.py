"""route: the first MoE stage. Router logits → softmax → top-k → renormalised weights.

Exactly HF Mixtral's order of operations: the softmax runs in fp32 over all experts,
then the top-k probabilities are renormalised to sum to one.

Shapes: T tokens, H hidden, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Routing:
    topk_ids_TK: torch.Tensor  # int64 expert ids
    topk_weights_TK: torch.Tensor  # fp32, each row sums to 1

    @property
    def num_tokens(self) -> int:
        return self.topk_ids_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids_TK.shape[1]


def route(x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int) -> Routing:
    logits_TE = F.linear(x_TH, gate_EH)
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return Routing(topk_ids_TK=ids_TK, topk_weights_TK=weights_TK)


def empty_routing(top_k: int, device: torch.device | str = "cpu") -> Routing:
    """A routing of zero tokens: how a worker with nothing to send joins a step."""
    return Routing(
        topk_ids_TK=torch.empty(0, top_k, dtype=torch.long, device=device),
        topk_weights_TK=torch.empty(0, top_k, dtype=torch.float32, device=device),
    )


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: how many entries of `expert_ids` (any shape, ids in [0, E)) name each expert.

    Not `torch.bincount`: on a GPU it reads the largest id back to the host to size its
    output, a sync per call; here the size is given, so nothing waits for the device.
    """
    ids = expert_ids.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts_E.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int64))
