"""Where each token of a step sits: positions, KV-cache slots, and per-sequence extents.

A step is a flat batch of T tokens from S sequences: each sequence contributes a prefill
chunk (query_len ≥ 1) or one decode token, appended after the context it already has
in the paged KV cache.

What attention reads from the cache depends on the step, not the layer, so every index
tensor is built once per step, on the host, in one flat buffer (pinned when the step runs
on a GPU) that is copied to the device with a single non-blocking copy; the tensors the
layers read are views of the device copy. They are derived with tensor ops from the step's
block tables (`StepTables`), which `StepTables.build` writes from scratch (the reference) and
the model runner keeps up to date across steps instead (incremental_tables.py). The dense
per-key forms the plain attention path wants (slots_SC, mask_SC, mask_LC) are derived from
those views on the device, lazily, the first time a layer asks, so a GPU kernel that reads the
block table never pays for them.

Shapes: T tokens, S decode sequences, C context length (keys visible to a query), B blocks
of a block table, P block size, L query length of one prefill chunk, N the prefill chunks'
context lengths summed, M all sequences of the step.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

_HOST = torch.device("cpu")


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


def window_covers_context(context_len: int, sliding_window: int | None) -> bool:
    """True when no query of a chunk ending at `context_len` has a key fall out of its window.

    The last query sees keys back to `context_len - sliding_window`; when that is ≤ 0 the
    window cuts nothing and causal masking alone is exact.
    """
    return sliding_window is None or context_len <= sliding_window


@dataclass(frozen=True)
class DecodeBatch:
    """The step's decode tokens (query_len == 1): one row per sequence, padded block tables."""

    rows_S: torch.Tensor  # int64 [S], each token's row in the flat batch
    block_tables_SB: torch.Tensor  # int32 [S, B]; padding (block 0) lies past each context's end
    context_lens_S: torch.Tensor  # int32 [S], keys in the cache including the new token
    max_context_len: int  # host copy of context_lens_S.max(): the padded width C, no device sync
    block_size: int
    sliding_window: int | None = None

    @cached_property
    def slots_SC(self) -> torch.Tensor:
        """int64 [S, C]; padding past a context points at a real slot and is masked out."""
        pos_C = torch.arange(self.max_context_len, device=self.block_tables_SB.device)
        tables_SC = self.block_tables_SB.long()[:, pos_C // self.block_size]
        return tables_SC * self.block_size + pos_C % self.block_size

    @cached_property
    def mask_SC(self) -> torch.Tensor:
        """bool [S, C], the keys each decode token may attend."""
        pos_C = torch.arange(self.max_context_len, device=self.context_lens_S.device)
        ctx_S1 = self.context_lens_S.long()[:, None]
        return visible_mask(ctx_S1 - 1, pos_C, self.sliding_window)[:, 0, :] & (pos_C < ctx_S1)


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's prefill chunk (query_len > 1) and the context it attends."""

    rows: slice  # its tokens in the flat batch
    context_len: int  # C: keys in the cache including the chunk itself
    slots_C: torch.Tensor  # int64 [C]
    positions_L: torch.Tensor  # int64 [L]
    sliding_window: int | None = None

    @property
    def query_len(self) -> int:
        return self.rows.stop - self.rows.start

    @property
    def window_covers_context(self) -> bool:
        return window_covers_context(self.context_len, self.sliding_window)

    @cached_property
    def mask_LC(self) -> torch.Tensor:
        """bool [L, C]; only the plain path and windowed chunks need it."""
        k_pos_C = torch.arange(self.context_len, device=self.positions_L.device)
        return visible_mask(self.positions_L, k_pos_C, self.sliding_window)


@dataclass(frozen=True)
class AttentionMetadata:
    extents: tuple[SeqExtent, ...]
    block_size: int
    positions_T: torch.Tensor  # int64 [T]
    slot_mapping_T: torch.Tensor  # int64 [T], cache slot written by each new token
    query_starts: tuple[int, ...]  # offset of each sequence's first token in the flat batch
    decode: DecodeBatch | None  # None when the step has no decode token
    prefill: tuple[PrefillChunk, ...]
    # decode_batch / prefill_chunks, per sliding window: derived once, read by every layer.
    _per_step: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.positions_T.device

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
        """The step's decode tokens as one batch; None when it has none."""
        key = ("decode", sliding_window)
        if key not in self._per_step:
            self._per_step[key] = (replace(self.decode, sliding_window=sliding_window)
                                   if self.decode is not None else None)
        return self._per_step[key]

    def prefill_chunks(self, sliding_window: int | None) -> tuple[PrefillChunk, ...]:
        key = ("prefill", sliding_window)
        if key not in self._per_step:
            self._per_step[key] = tuple(replace(c, sliding_window=sliding_window) for c in self.prefill)
        return self._per_step[key]

    @classmethod
    def build(cls, extents: Sequence[SeqExtent], block_size: int,
              device: torch.device | str = _HOST) -> AttentionMetadata:
        """Every index tensor of the step, computed on the host from scratch, moved to `device` in
        one copy. The reference for the incremental path (incremental_tables.py)."""
        extents = tuple(extents)
        return cls.from_tables(extents, StepTables.build(extents, block_size), block_size, device)

    @classmethod
    def from_tables(cls, extents: Sequence[SeqExtent], tables: StepTables, block_size: int,
                    device: torch.device | str = _HOST) -> AttentionMetadata:
        """As `build`, from the step's block tables already on the host (`tables` describes
        `extents`, row for row). Only tensor ops per sequence; a Python loop over prefill chunks."""
        device = torch.device(device)
        extents = tuple(extents)
        host = _HostIndices.from_tables(tables, block_size)
        dev = _copy_to_device(host.int64_parts, host.int32_parts, device)
        positions_T, slot_mapping_T, decode_rows_S, prefill_slots_N = dev.int64
        block_tables_SB, context_lens_S = dev.int32

        decode = None
        if host.num_decode:
            decode = DecodeBatch(
                rows_S=decode_rows_S,
                block_tables_SB=block_tables_SB.view(host.num_decode, -1),
                context_lens_S=context_lens_S,
                max_context_len=host.max_decode_context_len,
                block_size=block_size,
            )
        prefill = []
        offset = 0
        for start, query_len, context_len in host.prefill_extents:
            rows = slice(start, start + query_len)
            prefill.append(PrefillChunk(
                rows=rows, context_len=context_len,
                slots_C=prefill_slots_N[offset: offset + context_len], positions_L=positions_T[rows],
            ))
            offset += context_len
        return cls(
            extents=extents, block_size=block_size, positions_T=positions_T, slot_mapping_T=slot_mapping_T,
            query_starts=host.query_starts, decode=decode, prefill=tuple(prefill),
        )


@dataclass(frozen=True)
class StepTables:
    """The step's M sequences on the host: where each starts, how many tokens it brings, and its
    block table cut to the blocks its context uses, padded with block 0 to the widest ([M, B], so
    slots of all tokens come from a few tensor ops, not a loop per token)."""

    start_pos_M: torch.Tensor  # int64
    query_lens_M: torch.Tensor  # int64
    tables_MB: torch.Tensor  # int32; B = the most blocks any context uses; 0 past each context's blocks

    @property
    def num_seqs(self) -> int:
        return self.start_pos_M.shape[0]

    @classmethod
    def build(cls, extents: Sequence[SeqExtent], block_size: int) -> StepTables:
        """From scratch: every row of every table, every step (the reference)."""
        P = block_size
        needed = [-(-e.context_len // P) for e in extents]
        for ext, need in zip(extents, needed, strict=True):
            if len(ext.block_table) < need:
                raise ValueError(f"block table of {len(ext.block_table)} blocks cannot hold "
                                 f"{ext.context_len} tokens")
        max_blocks = max(needed, default=0)
        tables_MB = _int_tensor("i", itertools.chain.from_iterable(
            itertools.chain(e.block_table[:n], itertools.repeat(0, max_blocks - n))
            for e, n in zip(extents, needed, strict=True)
        )).view(len(extents), max_blocks)
        return cls(start_pos_M=_int_tensor("q", (e.start_pos for e in extents)),
                   query_lens_M=_int_tensor("q", (e.query_len for e in extents)), tables_MB=tables_MB)


@dataclass(frozen=True)
class _HostIndices:
    """The step's index tensors on the host, in the order they are packed."""

    query_starts: tuple[int, ...]
    int64_parts: tuple[torch.Tensor, ...]  # positions_T, slot_mapping_T, decode rows_S, prefill slots_N
    int32_parts: tuple[torch.Tensor, ...]  # decode block_tables_SB (flattened), decode context_lens_S
    num_decode: int
    max_decode_context_len: int
    prefill_extents: tuple[tuple[int, int, int], ...]  # (first row, query_len, context_len) per chunk

    @classmethod
    def from_tables(cls, tables: StepTables, block_size: int) -> _HostIndices:
        P = block_size
        query_lens_M, start_pos_M, tables_MB = tables.query_lens_M, tables.start_pos_M, tables.tables_MB
        M = tables.num_seqs
        ctx_M = start_pos_M + query_lens_M
        num_decode = int((query_lens_M == 1).sum())
        if num_decode == M:
            return cls._pure_decode(tables, ctx_M, block_size)
        starts_M = torch.cumsum(query_lens_M, 0) - query_lens_M
        seq_T = torch.repeat_interleave(torch.arange(M), query_lens_M)
        positions_T = start_pos_M[seq_T] + torch.arange(seq_T.numel()) - starts_M[seq_T]
        slot_mapping_T = _slots(tables_MB, seq_T, positions_T, P)

        is_decode_M = query_lens_M == 1
        decode_M = is_decode_M.nonzero()[:, 0]
        prefill_M = (~is_decode_M).nonzero()[:, 0]
        max_decode_ctx = int(ctx_M[decode_M].max()) if num_decode else 0
        block_tables_SB = tables_MB[decode_M, :-(-max_decode_ctx // P)]

        # Each prefill chunk's whole context (0 .. context_len-1), chunks back to back.
        ctx_pf = ctx_M[prefill_M]
        seq_N = torch.repeat_interleave(prefill_M, ctx_pf)
        firsts_pf = torch.cumsum(ctx_pf, 0) - ctx_pf
        pos_N = torch.arange(seq_N.numel()) - torch.repeat_interleave(firsts_pf, ctx_pf)
        prefill_slots_N = _slots(tables_MB, seq_N, pos_N, P)

        return cls(
            query_starts=tuple(starts_M.tolist()),
            int64_parts=(positions_T, slot_mapping_T, starts_M[decode_M], prefill_slots_N),
            int32_parts=(block_tables_SB.reshape(-1), ctx_M[decode_M].int()),
            num_decode=num_decode, max_decode_context_len=max_decode_ctx,
            prefill_extents=tuple(zip(starts_M[prefill_M].tolist(), query_lens_M[prefill_M].tolist(),
                                      ctx_pf.tolist(), strict=True)),
        )

    @classmethod
    def _pure_decode(cls, tables: StepTables, ctx_M: torch.Tensor, block_size: int) -> _HostIndices:
        """Every sequence brings one token (the common step): token i is sequence i's, at its
        start position; no prefill parts. The same tensors the general case gives, in fewer ops."""
        M, P = tables.num_seqs, block_size
        positions_T = tables.start_pos_M
        rows_M = torch.arange(M)
        slot_mapping_T = _slots(tables.tables_MB, rows_M, positions_T, P)
        return cls(
            query_starts=tuple(range(M)),
            int64_parts=(positions_T, slot_mapping_T, rows_M, torch.empty(0, dtype=torch.long)),
            int32_parts=(tables.tables_MB.reshape(-1), ctx_M.int()),
            num_decode=M, max_decode_context_len=int(ctx_M.max()) if M else 0, prefill_extents=(),
        )


def _int_tensor(typecode: str, values: Iterable[int]) -> torch.Tensor:
    """int64 ("q") or int32 ("i") values on the host. Through an array: several times faster than
    torch.tensor on a list (thousands of block ids per step at large batches)."""
    buf = array.array(typecode, values)
    dtype = torch.long if typecode == "q" else torch.int32
    return torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)


def _slots(tables_MB: torch.Tensor, seq_X: torch.Tensor, pos_X: torch.Tensor,
           block_size: int) -> torch.Tensor:
    return tables_MB[seq_X, pos_X // block_size].long() * block_size + pos_X % block_size


@dataclass(frozen=True)
class _DeviceIndices:
    int64: tuple[torch.Tensor, ...]
    int32: tuple[torch.Tensor, ...]


def _copy_to_device(int64_parts: Sequence[torch.Tensor], int32_parts: Sequence[torch.Tensor],
                    device: torch.device) -> _DeviceIndices:
    """Pack the parts into one int64 host buffer, copy it once, and slice views of the copy.

    The int32 parts sit after the int64 ones, two per int64 word, and are read back through
    a reinterpreting view. Pinned memory lets the copy run asynchronously with the host,
    which goes on to launch the step's kernels; the caching host allocator keeps the buffer
    alive until the copy is done.
    """
    n64 = sum(p.numel() for p in int64_parts)
    n32 = sum(p.numel() for p in int32_parts)
    host = torch.empty(n64 + -(-n32 // 2), dtype=torch.long, pin_memory=device.type == "cuda")
    host32 = host[n64:].view(torch.int32)
    _fill(host, int64_parts)
    _fill(host32, int32_parts)
    buf = host if device.type == "cpu" else host.to(device, non_blocking=True)
    return _DeviceIndices(int64=_split(buf, int64_parts),
                          int32=_split(buf[n64:].view(torch.int32), int32_parts))


def _fill(buf: torch.Tensor, parts: Sequence[torch.Tensor]) -> None:
    offset = 0
    for p in parts:
        buf[offset: offset + p.numel()].copy_(p.reshape(-1))
        offset += p.numel()


def _split(buf: torch.Tensor, parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    views = []
    offset = 0
    for p in parts:
        views.append(buf[offset: offset + p.numel()])
        offset += p.numel()
    return tuple(views)
