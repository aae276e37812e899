"""Paged KV cache tensors of one attention worker.

Shapes: B blocks, P slots per block (block_size), G key/value heads, D head dim.
Block tables are owned by the scheduler (cluster/block_manager.py); this module only
stores tensors and moves rows in and out by slot index.
"""

from __future__ import annotations

import torch

from workers.weights.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim_)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.k_BPGD = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v_BPGD = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def write(self, layer: int, slot_mapping_T: torch.Tensor, k_TGD: torch.Tensor,
              v_TGD: torch.Tensor) -> None:
        self.k_BPGD[layer].view(self.num_slots, *k_TGD.shape[1:]).index_copy_(0, slot_mapping_T, k_TGD)
        self.v_BPGD[layer].view(self.num_slots, *v_TGD.shape[1:]).index_copy_(0, slot_mapping_T, v_TGD)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows at `slots` (any shape [...]), returned as [..., G, D]."""
        k = self.k_BPGD[layer].view(self.num_slots, *self.k_BPGD[layer].shape[2:])
        v = self.v_BPGD[layer].view(self.num_slots, *self.v_BPGD[layer].shape[2:])
        return k[slots], v[slots]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_BPGD + self.v_BPGD)
