"""How much of a GPU a worker may use, and how many KV blocks that buys (vLLM users' terms).

On a GPU the KV cache is what is left of this worker's share of the device after its weights
and a reserve for one step's activations:

    budget    = total memory × gpu_memory_utilization × this worker's fraction of the GPU
    kv_bytes  = budget − weights − activation reserve
    kv blocks = kv_bytes // bytes per block

The fraction is what Ray gave the worker (0.25 with `--gpus-per-worker 0.25`), so workers that
share one GPU split it instead of each claiming 90% of it. On a CPU the count is the
configured one (DEFAULT_CPU_KV_BLOCKS unless set): host memory is not ours to size.

The arithmetic is pure; only `cuda_memory` reads the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.weights.config import ModelConfig

DEFAULT_CPU_KV_BLOCKS = 1024
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
GIB = 1 << 30


class DeviceMemoryError(RuntimeError):
    """A set-up that does not fit the device, said at start with the numbers."""


@dataclass(frozen=True)
class MemoryReport:
    """What an attention worker (or the single-process engine) holds: for logs and the banner."""

    device: str
    dtype: str
    weight_bytes: int
    num_kv_blocks: int
    block_size: int
    kv_bytes: int

    @property
    def max_cached_tokens(self) -> int:
        """The longest context that fits (all of the cache, one sequence)."""
        return self.num_kv_blocks * self.block_size

    def summary(self) -> str:
        return (f"{self.device} {self.dtype}: weights {self.weight_bytes / GIB:.2f} GiB, "
                f"KV cache {self.num_kv_blocks} blocks × {self.block_size} tokens "
                f"({self.kv_bytes / GIB:.2f} GiB, {self.max_cached_tokens} tokens)")


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one block of tokens."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim_ * itemsize


def activation_reserve_bytes(cfg: ModelConfig, max_num_batched_tokens: int, max_num_seqs: int,
                             dtype: torch.dtype) -> int:
    """A generous bound on one step's transient memory: the widest per-token tensors of a layer
    (the experts' fused w1|w3 output for every routed row dominates) plus fp32 logits and the
    sampler's sorted copies for every sequence, and 512 MiB for the CUDA context's workspaces."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = (cfg.num_experts_per_tok * 3 * cfg.intermediate_size
                 + 8 * max(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim_)) * itemsize
    logits = max_num_seqs * cfg.vocab_size * 4 * 4
    return max_num_batched_tokens * per_token + logits + 512 * (1 << 20)


def num_kv_blocks_for_budget(*, total_bytes: int, utilization: float, gpu_fraction: float,
                             weight_bytes: int, reserve_bytes: int, block_bytes: int) -> int:
    """Pure: the blocks that fit; raises DeviceMemoryError when the weights alone do not."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    if not 0 < gpu_fraction <= 1:
        raise ValueError(f"the GPU fraction must be in (0, 1], got {gpu_fraction}")
    budget = int(total_bytes * utilization * gpu_fraction)
    free = budget - weight_bytes - reserve_bytes
    if free < block_bytes:
        raise DeviceMemoryError(
            f"no room for a KV cache: this worker's share of the GPU is {budget / GIB:.2f} GiB "
            f"({utilization:g} of {total_bytes / GIB:.1f} GiB × {gpu_fraction:g}), its weights take "
            f"{weight_bytes / GIB:.2f} GiB and one step needs about {reserve_bytes / GIB:.2f} GiB; "
            "raise --gpu-memory-utilization, give each worker more of a GPU, or use more workers")
    return free // block_bytes


def check_weights_fit(*, weight_bytes: int, free_bytes: int, total_bytes: int, what: str) -> None:
    """Before loading: a checkpoint share that cannot fit fails here, not as an OOM halfway."""
    if weight_bytes > free_bytes:
        raise DeviceMemoryError(
            f"{what} needs {weight_bytes / GIB:.2f} GiB of weights but the GPU has "
            f"{free_bytes / GIB:.2f} GiB free of {total_bytes / GIB:.1f} GiB; use more expert "
            "workers, a smaller dtype, or a larger GPU")


def cuda_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device, as the driver sees them."""
    return torch.cuda.mem_get_info(device)


def ensure_weights_fit(device: torch.device, weight_bytes: int, what: str) -> None:
    """On a GPU, before a byte is loaded: `what`'s weights must fit its free memory (a no-op on a CPU)."""
    if device.type == "cuda":
        free, total = cuda_memory(device)
        check_weights_fit(weight_bytes=weight_bytes, free_bytes=free, total_bytes=total, what=what)


def check_fits_cache(num_kv_blocks: int, block_size: int, max_model_len: int) -> None:
    """One sequence of max_model_len must fit, or the scheduler could never finish it."""
    if num_kv_blocks * block_size < max_model_len:
        raise DeviceMemoryError(
            f"the KV cache holds {num_kv_blocks * block_size} tokens ({num_kv_blocks} blocks × "
            f"{block_size}), fewer than max_model_len {max_model_len}: lower --max-model-len or "
            "raise --gpu-memory-utilization")
