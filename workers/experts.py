"""experts: the third MoE stage. SwiGLU experts `w2(silu(w1 x) * w3 x)`, grouped.

`grouped_experts` expects rows already sorted by expert (dispatch does that) and runs two
matmuls per expert that received tokens: one for the fused w1|w3 projection, one for w2,
each through a weight packed once at load (linear.py). Experts with no tokens cost nothing.
`reference_experts` is the slow, obviously-correct per-expert loop over unsorted tokens,
on the plain weights with `F.linear`, that the grouped path is tested against.

Shapes: N dispatched rows, T tokens, H hidden, F intermediate, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from workers.linear import PackedLinear


class ExpertTensorsLike(Protocol):
    w1: torch.Tensor  # [F, H]
    w2: torch.Tensor  # [H, F]
    w3: torch.Tensor  # [F, H]


@dataclass(frozen=True)
class LayerExperts:
    """The experts of one layer that live in this process, stacked in `expert_ids` order.

    The stacks are the plain weights (the reference path reads them); `w13` and `w2` are the
    same weights packed per expert when built, for the grouped path. Pickling repacks them.
    """

    expert_ids: tuple[int, ...]
    w13_EFH: torch.Tensor  # [E_local, 2F, H]: w1 rows then w3 rows
    w2_EHF: torch.Tensor  # [E_local, H, F]
    w13: tuple[PackedLinear, ...] = field(init=False, repr=False, compare=False)
    w2: tuple[PackedLinear, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "w13", tuple(PackedLinear.pack(w) for w in self.w13_EFH))
        object.__setattr__(self, "w2", tuple(PackedLinear.pack(w) for w in self.w2_EHF))

    @property
    def intermediate_size(self) -> int:
        return self.w2_EHF.shape[2]

    @classmethod
    def stack(cls, tensors: Mapping[int, ExpertTensorsLike]) -> LayerExperts:
        ids = tuple(sorted(tensors))
        if not ids:
            raise ValueError("a LayerExperts needs at least one expert")
        w13 = torch.stack([torch.cat([tensors[e].w1, tensors[e].w3], dim=0) for e in ids])
        w2 = torch.stack([tensors[e].w2 for e in ids])
        return cls(expert_ids=ids, w13_EFH=w13, w2_EHF=w2)


def swiglu(x_NH: torch.Tensor, w13_FH: torch.Tensor, w2_HF: torch.Tensor) -> torch.Tensor:
    """The reference SwiGLU: plain weights, plain `F.linear`."""
    gate, up = F.linear(x_NH, w13_FH).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2_HF)


def packed_swiglu(x_NH: torch.Tensor, w13: PackedLinear, w2: PackedLinear) -> torch.Tensor:
    gate, up = w13(x_NH).chunk(2, dim=-1)
    return w2(F.silu(gate) * up)


def grouped_experts(x_NH: torch.Tensor, counts: list[int], experts: LayerExperts) -> torch.Tensor:
    """Rows of local expert i are x_NH[sum(counts[:i]) : sum(counts[:i+1])]."""
    if len(counts) != len(experts.expert_ids):
        raise ValueError(f"{len(counts)} counts for {len(experts.expert_ids)} local experts")
    out_NH = torch.empty_like(x_NH)
    start = 0
    for i, n in enumerate(counts):
        if n:
            out_NH[start:start + n] = packed_swiglu(x_NH[start:start + n], experts.w13[i], experts.w2[i])
        start += n
    return out_NH


def reference_experts(x_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                      experts: LayerExperts) -> torch.Tensor:
    """The whole MoE output, one expert at a time, no sorting: the oracle for the fast path."""
    out_TH = torch.zeros(x_TH.shape, dtype=torch.float32)
    for i, e in enumerate(experts.expert_ids):
        token_idx, k_idx = torch.where(topk_ids_TK == e)
        if token_idx.numel() == 0:
            continue
        y = swiglu(x_TH[token_idx], experts.w13_EFH[i], experts.w2_EHF[i]).float()
        out_TH.index_add_(0, token_idx, y * topk_weights_TK[token_idx, k_idx, None])
    return out_TH.to(x_TH.dtype)
