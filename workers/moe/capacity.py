"""Expert capacity (Switch Transformer / GShard): an optional cap on rows per expert per step.

    capacity = ceil(capacity_factor × T × K / E)

with T the tokens *on this rank* in this step, K top-k, E experts per layer. Per rank, not
global: every rank can apply it before dispatch without another round of communication,
and the result depends only on this rank's tokens, so it is deterministic and the same
whether the experts are local or remote. (A global cap would need the count exchange first
and would make one rank's drops depend on the others' batches.)

Priority is token order, as in Switch/GShard: within an expert, the earliest tokens keep
their place and the later ones are dropped (no sort by routing weight, and the same rule
for every k).
A dropped assignment is not sent; the token keeps its other experts with their weights
unchanged (no renormalisation), so a token dropped everywhere adds zero and passes
through on the residual alone. `None` means dropless, the default and the exact path.

Shapes: T tokens, K top-k, A = T·K assignments (token-major), E experts.
"""

from __future__ import annotations

import math

import torch

from workers.moe.route import count_per_expert


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    # Rounded before ceil so that, e.g., 1.1 × 10 × 2 / 2 is 11, not 12.
    return math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9))


def position_in_expert(expert_ids_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each assignment, how many earlier assignments (in order) chose the same expert."""
    order_A = torch.argsort(expert_ids_A, stable=True)
    counts_E = count_per_expert(expert_ids_A, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    index_A = torch.arange(expert_ids_A.numel(), device=expert_ids_A.device)
    sorted_pos_A = index_A - starts_E[expert_ids_A[order_A]]
    pos_A = torch.empty_like(sorted_pos_A)
    pos_A[order_A] = sorted_pos_A
    return pos_A


def keep_within_capacity(topk_ids_TK: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """bool [T, K]: True where the assignment fits in its expert's capacity."""
    num_tokens, top_k = topk_ids_TK.shape
    cap = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    pos_A = position_in_expert(topk_ids_TK.reshape(-1), num_experts)
    return (pos_A < cap).view(num_tokens, top_k)
