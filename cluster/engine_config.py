"""Engine knobs: one frozen dataclass, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.scheduler_config import SchedulerConfig


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_num_seqs: int = 64  # per attention worker
    max_num_batched_tokens: int = 512  # per attention worker and step
    block_size: int = 16
    num_kv_blocks: int = 1024  # per attention worker
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_attention_workers: int = 1  # data-parallel ranks, each with its own KV cache

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks",
                     "num_attention_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def scheduler_config(self, model_max_len: int) -> SchedulerConfig:
        max_len = min(self.max_model_len or model_max_len, model_max_len)
        return SchedulerConfig(
            num_kv_blocks=self.num_kv_blocks, max_model_len=max_len, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, block_size=self.block_size,
        )
