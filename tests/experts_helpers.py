"""Random expert layers and expert-sorted rows, for the experts tests on the CPU and on CUDA.

Shapes: N rows, H hidden, F intermediate, E experts.
"""

from __future__ import annotations

import torch

from workers.moe.experts import LayerExperts, reference_experts


def random_experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", seed: int = 0, scale: float = 0.3) -> LayerExperts:
    # Drawn on the device itself: full-width layers are gigabytes, slow to draw on a host.
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g, device=device) * scale
    w2 = torch.randn(num_experts, hidden, inter, generator=g, device=device) * scale
    return LayerExperts(tuple(range(num_experts)), w13.to(dtype), w2.to(dtype))


def sorted_rows(counts: list[int], hidden: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_NH, counts_E): rows already grouped by expert, the way dispatch hands them over."""
    g = torch.Generator().manual_seed(seed)
    x_NH = torch.randn(sum(counts), hidden, generator=g).to(device, dtype)
    return x_NH, torch.tensor(counts, dtype=torch.int64, device=device)


def per_row_reference(x_NH: torch.Tensor, counts: list[int], experts: LayerExperts) -> torch.Tensor:
    """Each row through its own expert with weight 1, by `reference_experts` (top-1, unsorted
    semantics), in fp32 on fp32 copies of the weights: the oracle for `grouped_experts`."""
    ids_N1 = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[:, None]
    ids_N1 = ids_N1.to(x_NH.device)
    fp32 = LayerExperts(experts.expert_ids, experts.w13_EFH.float(), experts.w2_EHF.float())
    weights_N1 = torch.ones(ids_N1.shape, dtype=torch.float32, device=x_NH.device)
    return reference_experts(x_NH.float(), ids_N1, weights_N1, fp32)
