"""Where each token of a step sits: positions, KV-cache slots, and per-sequence extents.

A step is a flat batch of T tokens from S sequences: each sequence contributes a prefill
chunk (query_len ≥ 1) or one decode token, appended after the context it already has
in the paged KV cache.

What attention reads from the cache (which slots, which keys each query may see) depends
on the step, not the layer, so it is built once per step, on the first layer's request,
and every later layer reuses it.

Shapes: T tokens, S decode sequences, C context length (keys visible to a query), B blocks
of a block table, P block size, L query length of one prefill chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """True where a query at q_pos may attend a key at k_pos (causal, and inside the window).

    HF's Mixtral window lets a token see itself and the `sliding_window - 1` before it.
    """
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


def context_slots(block_table: tuple[int, ...], context_len: int, block_size: int) -> torch.Tensor:
    """Cache slot of each of one sequence's first `context_len` tokens, [C]."""
    pos_C = torch.arange(context_len)
    blocks_C = torch.tensor(block_table, dtype=torch.long)[pos_C // block_size]
    return blocks_C * block_size + pos_C % block_size


@dataclass(frozen=True)
class DecodeBatch:
    """The step's decode tokens (query_len == 1), padded to the longest context."""

    rows_S: torch.Tensor  # int64 [S], each token's row in the flat batch
    slots_SC: torch.Tensor  # int64 [S, C]; padding past a context points at a real slot, masked out
    mask_SC: torch.Tensor  # bool [S, C], the keys each token may attend

    @classmethod
    def build(cls, extents: Sequence[SeqExtent], rows: Sequence[int], block_size: int,
              sliding_window: int | None) -> DecodeBatch:
        ctx_S = torch.tensor([e.context_len for e in extents], dtype=torch.long)
        max_ctx = int(ctx_S.max())
        num_blocks = -(-max_ctx // block_size)
        # One padded [S, B] block table; padding (block 0) is only read past a context's end.
        tables_SB = torch.tensor(
            [list(e.block_table[:num_blocks]) + [0] * (num_blocks - len(e.block_table)) for e in extents],
            dtype=torch.long)
        pos_C = torch.arange(max_ctx)
        slots_SC = tables_SB[:, pos_C // block_size] * block_size + pos_C % block_size
        mask_SC = visible_mask(ctx_S[:, None] - 1, pos_C, sliding_window)[:, 0, :] & (pos_C < ctx_S[:, None])
        return cls(rows_S=torch.tensor(rows, dtype=torch.long), slots_SC=slots_SC, mask_SC=mask_SC)


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's prefill chunk (query_len > 1) and the context it attends."""

    rows: slice  # its tokens in the flat batch
    slots_C: torch.Tensor  # int64 [C]
    mask_LC: torch.Tensor  # bool [L, C]

    @classmethod
    def build(cls, ext: SeqExtent, start: int, positions_T: torch.Tensor, block_size: int,
              sliding_window: int | None) -> PrefillChunk:
        rows = slice(start, start + ext.query_len)
        return cls(
            rows=rows,
            slots_C=context_slots(ext.block_table, ext.context_len, block_size),
            mask_LC=visible_mask(positions_T[rows], torch.arange(ext.context_len), sliding_window),
        )


@dataclass(frozen=True)
class AttentionMetadata:
    extents: tuple[SeqExtent, ...]
    block_size: int
    positions_T: torch.Tensor  # int64 [T]
    slot_mapping_T: torch.Tensor  # int64 [T], cache slot written by each new token
    query_starts: tuple[int, ...]  # offset of each sequence's first token in the flat batch
    # decode_batch / prefill_chunks, per sliding window: derived once, read by every layer.
    _per_step: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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

    def decode_batch(self, sliding_window: int | None) -> DecodeBatch | None:
        """The step's decode tokens as one padded batch; None when it has none."""
        key = ("decode", sliding_window)
        if key not in self._per_step:
            seqs = [i for i, e in enumerate(self.extents) if e.query_len == 1]
            self._per_step[key] = DecodeBatch.build(
                [self.extents[i] for i in seqs], [self.query_starts[i] for i in seqs], self.block_size,
                sliding_window) if seqs else None
        return self._per_step[key]

    def prefill_chunks(self, sliding_window: int | None) -> tuple[PrefillChunk, ...]:
        key = ("prefill", sliding_window)
        if key not in self._per_step:
            self._per_step[key] = tuple(
                PrefillChunk.build(ext, start, self.positions_T, self.block_size, sliding_window)
                for ext, start in zip(self.extents, self.query_starts, strict=True) if ext.query_len > 1
            )
        return self._per_step[key]

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
