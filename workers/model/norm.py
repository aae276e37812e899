"""RMSNorm, computed in fp32 as HF does, so bf16 weights give the same numbers."""

import torch


def rms_norm(x_TH: torch.Tensor, weight_H: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x_TH.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight_H * x32.to(x_TH.dtype)
