"""How an attention worker sizes its paged KV cache (crosses the actor boundary in GroupSpec)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.device.memory import DEFAULT_GPU_MEMORY_UTILIZATION


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # None: the device decides (DEFAULT_CPU_KV_BLOCKS on a CPU; on a GPU, what fits in
    # gpu_memory_utilization of this worker's share after its weights: device_memory.py).
    num_blocks: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    # One step's size, for the activation reserve on a GPU.
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1 or unset, got {self.num_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
