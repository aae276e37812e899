"""Rotary position embeddings (the HF "default" rope: half-split rotation, no scaling).

Shapes: T tokens, A attention heads (query or key/value), D head dim.
"""

import torch


class RotaryEmbedding:
    def __init__(self, head_dim: int, theta: float, device: torch.device | str = "cpu") -> None:
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        self.inv_freq = 1.0 / (theta ** exponent)

    def cos_sin(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles whatever the model dtype: positions up to 32k lose precision in bf16.
        freqs_TD2 = positions_T.float()[:, None] * self.inv_freq[None, :]
        emb_TD = torch.cat((freqs_TD2, freqs_TD2), dim=-1)
        return emb_TD.cos(), emb_TD.sin()


def apply_rope(x_TAD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    half = x_TAD.shape[-1] // 2
    rotated = torch.cat((-x_TAD[..., half:], x_TAD[..., :half]), dim=-1)
    cos, sin = cos_TD[:, None, :].to(x_TAD.dtype), sin_TD[:, None, :].to(x_TAD.dtype)
    return x_TAD * cos + rotated * sin
