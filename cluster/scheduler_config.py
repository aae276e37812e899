"""The scheduler's limits: one frozen dataclass, validated when built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    num_kv_blocks: int  # KV blocks of one attention worker's cache
    max_model_len: int  # prompt + max_tokens may not exceed this
    max_num_seqs: int = 64  # running sequences (and so sequences per step)
    max_num_batched_tokens: int = 512  # tokens computed per step, prefill and decode together
    block_size: int = 16  # positions per KV block

    def __post_init__(self) -> None:
        for name in (
            "num_kv_blocks",
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        # Every running sequence decodes one token per step; a smaller budget would starve
        # the newest running sequences while they hold their blocks.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )

    @property
    def num_kv_slots(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def max_seq_len(self) -> int:
        """The longest sequence (prompt + outputs) that can ever run."""
        return min(self.max_model_len, self.num_kv_slots)
