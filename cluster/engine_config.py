"""Engine knobs: one frozen dataclass, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.scheduler_config import SchedulerConfig
from workers.device.memory import DEFAULT_GPU_MEMORY_UTILIZATION
from workers.model.cache_config import CacheConfig

DEFAULT_LOW_LATENCY_MAX_TOKENS = 64


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_num_seqs: int = 64  # per attention worker
    max_num_batched_tokens: int = 512  # per attention worker and step
    block_size: int = 16
    # Per attention worker. None: the device decides (1024 on a CPU; on a GPU what fits in
    # gpu_memory_utilization after the weights); the builders fill in the number the cache
    # holders report before the engine starts.
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_attention_workers: int = 1  # data-parallel ranks, each with its own KV cache
    # Decode steps with at most this many tokens on every attention worker dispatch through
    # fixed-capacity buffers (no counts round trip); larger steps and prefill go exact.
    # 0: always exact. Measured by tests/bench/bench_distributed.py (cluster/dispatch_mode.py).
    low_latency_max_tokens: int = DEFAULT_LOW_LATENCY_MAX_TOKENS
    # On CUDA, decode steps replay CUDA graphs: the single-process engine's, captured at start-up
    # (workers/model/cuda_graph_runner.py), and a group's on NCCL, captured by every worker after
    # each forming (cluster/decode_graphs.py); True runs every step eagerly (vLLM's --enforce-eager).
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_attention_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.low_latency_max_tokens < 0:
            raise ValueError(f"low_latency_max_tokens must be >= 0, got {self.low_latency_max_tokens}")
        self.cache_config()  # validates num_kv_blocks and gpu_memory_utilization

    def cache_config(self) -> CacheConfig:
        return CacheConfig(block_size=self.block_size, num_blocks=self.num_kv_blocks,
                           gpu_memory_utilization=self.gpu_memory_utilization,
                           max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs)

    def scheduler_config(self, model_max_len: int) -> SchedulerConfig:
        if self.num_kv_blocks is None:
            raise ValueError("num_kv_blocks is decided by the KV cache's holder; build the engine "
                             "through build_local_engine / build_distributed_engine")
        max_len = min(self.max_model_len or model_max_len, model_max_len)
        return SchedulerConfig(
            num_kv_blocks=self.num_kv_blocks, max_model_len=max_len, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, block_size=self.block_size,
        )
