"""Where each token of a step sits: positions, KV-cache slots, and per-sequence extents.

A step is a flat batch of T tokens from S sequences: each sequence contributes a prefill
chunk (query_len ≥ 1) or one decode token, appended after the context it already has
in the paged KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqExtent:
    """One sequence's share of a step."""

    start_pos: int  # tokens already in the KV cache
    query_len: int  # new tokens computed this step
    block_table: tuple[int, ...]

    @property
    def context_len(self) -> int:
        return self.start_pos + self.query_len


@dataclass(frozen=True)
class AttentionMetadata:
    extents: tuple[SeqExtent, ...]
    block_size: int
    positions_T: torch.Tensor  # int64 [T]
    slot_mapping_T: torch.Tensor  # int64 [T], cache slot written by each new token
    query_starts: tuple[int, ...]  # offset of each sequence's first token in the flat batch

    @property
    def num_tokens(self) -> int:
        return int(self.positions_T.numel())

    @property
    def num_seqs(self) -> int:
        return len(self.extents)

    @property
    def last_token_indices(self) -> list[int]:
        """Row of each sequence's last new token: where its next-token logits come from."""
        return [s + e.query_len - 1 for s, e in zip(self.query_starts, self.extents, strict=True)]

    @classmethod
    def build(cls, extents: Sequence[SeqExtent], block_size: int) -> AttentionMetadata:
        positions: list[int] = []
        slots: list[int] = []
        starts: list[int] = []
        for ext in extents:
            starts.append(len(positions))
            needed_blocks = -(-ext.context_len // block_size)
            if len(ext.block_table) < needed_blocks:
                raise ValueError(
                    f"block table of {len(ext.block_table)} blocks cannot hold {ext.context_len} tokens"
                )
            for pos in range(ext.start_pos, ext.context_len):
                positions.append(pos)
                slots.append(ext.block_table[pos // block_size] * block_size + pos % block_size)
        return cls(
            extents=tuple(extents),
            block_size=block_size,
            positions_T=torch.tensor(positions, dtype=torch.long),
            slot_mapping_T=torch.tensor(slots, dtype=torch.long),
            query_starts=tuple(starts),
        )
