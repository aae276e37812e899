"""The number of KV blocks a cache holder gets: configured on a CPU, what fits on a GPU."""

from __future__ import annotations

import torch

from workers.device.memory import (
    DEFAULT_CPU_KV_BLOCKS,
    activation_reserve_bytes,
    cuda_memory,
    kv_block_bytes,
    num_kv_blocks_for_budget,
)
from workers.model.cache_config import CacheConfig
from workers.weights.config import ModelConfig


def decide_num_kv_blocks(cache: CacheConfig, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                         *, weight_bytes: int, gpu_fraction: float = 1.0) -> int:
    """An explicit `cache.num_blocks` always wins; unset, the device decides (device_memory.py).

    `weight_bytes` are what this process holds on the device: its budget is shared with them.
    """
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type != "cuda":
        return DEFAULT_CPU_KV_BLOCKS
    _, total = cuda_memory(device)
    return num_kv_blocks_for_budget(
        total_bytes=total, utilization=cache.gpu_memory_utilization, gpu_fraction=gpu_fraction,
        weight_bytes=weight_bytes,
        reserve_bytes=activation_reserve_bytes(cfg, cache.max_num_batched_tokens, cache.max_num_seqs, dtype),
        block_bytes=kv_block_bytes(cfg, cache.block_size, dtype))
