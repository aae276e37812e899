"""The static input buffers a decode graph reads, and how a step's inputs are padded into them.

A captured graph reads fixed device addresses, so a decode step's inputs cannot be fresh
tensors (as AttentionMetadata.build makes for an eager step): they are written into buffers
allocated once, and the graph of bucket B reads their first B rows. Rows past the step's own
sequences are padding, made inert: token 0 at position 0, its KV written into a scratch block
that no sequence owns, context length 0 (the paged decode kernel gives such a row zeros and
reads nothing). Their hidden states are computed and thrown away; no operation of the forward
mixes rows, so they cannot change a real row.

As for an eager step, the host builds the contents and one non-blocking copy moves them: the
per-row values land in place; the block tables, only as wide as this step's longest context
needs, land in a staging area and one device copy puts them into the static [rows, W] table.
Entries past a row's context are never read (the kernel masks its loads by the context
length): this step writes the scratch block there, and the rest of the static table may hold
stale block ids from earlier steps.

Shapes: B rows of a bucket, R rows of the largest bucket (every buffer's capacity), W blocks
of the static block table, w blocks of this step's widest table, P block size.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.model.attention_metadata import AttentionMetadata, DecodeBatch, SeqExtent, StepTables


@dataclass(frozen=True)
class DecodeGraphShape:
    """The fixed geometry of the static buffers."""

    max_batch: int  # R: rows of every buffer, the largest bucket
    max_blocks: int  # W: block-table width, blocks of the longest context a graph may attend
    block_size: int  # P
    scratch_block: int  # a KV block no sequence owns: padding rows write there

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_blocks", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scratch_block < 0:
            raise ValueError(f"scratch_block must be >= 0, got {self.scratch_block}")

    @property
    def max_context_len(self) -> int:
        return self.max_blocks * self.block_size

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.block_size


@dataclass(frozen=True)
class PaddedDecodeStep:
    """One decode step padded to its bucket, on the host: what the static buffers will hold."""

    token_ids_B: torch.Tensor  # int64
    positions_B: torch.Tensor  # int64
    slot_mapping_B: torch.Tensor  # int64, KV slot each row writes
    context_lens_B: torch.Tensor  # int32, keys each row attends (its new one included); 0: padding
    block_tables_Bw: torch.Tensor  # int32, cut to the step's widest context; padding: the scratch block

    @property
    def num_rows(self) -> int:
        return self.token_ids_B.shape[0]


def pad_decode_step(token_ids: Sequence[int], extents: Sequence[SeqExtent], bucket: int,
                    shape: DecodeGraphShape) -> PaddedDecodeStep:
    """The step's S decode rows, then bucket − S padding rows pointing at the scratch block."""
    return pad_decode_tables(token_ids, StepTables.build(extents, shape.block_size), bucket, shape)


def pad_decode_tables(token_ids: Sequence[int], tables: StepTables, bucket: int,
                      shape: DecodeGraphShape) -> PaddedDecodeStep:
    """As `pad_decode_step`, from the step's block tables already on the host (the model runner
    keeps them across steps: incremental_tables.py). Tensor ops only, no loop over rows."""
    S, P = tables.num_seqs, shape.block_size
    if len(token_ids) != S or not S <= bucket <= shape.max_batch or bucket < 1:
        raise ValueError(f"{len(token_ids)} ids and {S} sequences do not fit a bucket of {bucket} "
                         f"(at most {shape.max_batch})")
    positions_S = tables.start_pos_M
    context_lens_S = positions_S + tables.query_lens_M
    # S = 0 is a step of padding only: a group's worker with no sequence still replays (its
    # collectives meet the others').
    too_long = S and int(context_lens_S.max()) > shape.max_context_len
    if too_long or not bool((tables.query_lens_M == 1).all()):
        raise ValueError(f"not a step of decode rows of at most {shape.max_context_len} keys: "
                         f"query lengths {tables.query_lens_M.tolist()}, contexts {context_lens_S.tolist()}")
    width = tables.tables_MB.shape[1]  # the widest context's blocks
    used_Sw = torch.arange(width) < ((context_lens_S + P - 1) // P)[:, None]
    tables_Bw = torch.full((bucket, width), shape.scratch_block, dtype=torch.int32)
    tables_Bw[:S] = torch.where(used_Sw, tables.tables_MB, shape.scratch_block)
    slots_S = tables.tables_MB[torch.arange(S), positions_S // P].long() * P + positions_S % P
    pad = bucket - S
    return PaddedDecodeStep(
        token_ids_B=_int_tensor("q", itertools.chain(token_ids, itertools.repeat(0, pad))),
        positions_B=_padded(positions_S, pad, 0),
        slot_mapping_B=_padded(slots_S, pad, shape.scratch_slot),
        context_lens_B=_padded(context_lens_S.int(), pad, 0),
        block_tables_Bw=tables_Bw,
    )


def _padded(x_S: torch.Tensor, pad: int, value: int) -> torch.Tensor:
    return torch.cat([x_S, torch.full((pad,), value, dtype=x_S.dtype)]) if pad else x_S


class DecodeGraphInputs:
    """Device buffers of R rows that every bucket's graph reads a prefix of.

    The int64 per-row values, then the int32 ones, then the block-table staging area share one
    flat buffer, so a step's contents go over in one copy; the static block table and the row
    indices (0..R-1, never rewritten) are buffers of their own.
    """

    @torch.inference_mode()
    def __init__(self, shape: DecodeGraphShape, device: torch.device) -> None:
        R, W = shape.max_batch, shape.max_blocks
        self.shape = shape
        self.device = device
        self._int32_at = 3 * R  # int64 words before the int32 region: ids, positions, slots
        self._flat = torch.zeros(self._int32_at + -(-(R + R * W) // 2), dtype=torch.long, device=device)
        flat32 = self._flat[self._int32_at:].view(torch.int32)
        self.token_ids_R = self._flat[:R]
        self.positions_R = self._flat[R:2 * R]
        self.slot_mapping_R = self._flat[2 * R:3 * R]
        self.context_lens_R = flat32[:R]
        self._staging = flat32[R:]
        self.rows_R = torch.arange(R, device=device)
        self.block_tables_RW = torch.full((R, W), shape.scratch_block, dtype=torch.int32, device=device)
        self.write(_all_padding(shape))  # inert contents until the first step: what warm-up runs on

    @torch.inference_mode()
    def write(self, step: PaddedDecodeStep) -> None:
        """Put a padded step into the buffers: one host→device copy and one copy on the device."""
        B, w = step.block_tables_Bw.shape
        R = self.shape.max_batch
        if B > R or w > self.shape.max_blocks:
            raise ValueError(f"a step of {B} rows × {w} blocks does not fit {R} × {self.shape.max_blocks}")
        num_words = self._int32_at + -(-(R + B * w) // 2)
        host = torch.zeros(num_words, dtype=torch.long, pin_memory=self.device.type == "cuda")
        host32 = host[self._int32_at:].view(torch.int32)
        host[:B].copy_(step.token_ids_B)
        host[R:R + B].copy_(step.positions_B)
        host[2 * R:2 * R + B].copy_(step.slot_mapping_B)
        host32[:B].copy_(step.context_lens_B)
        host32[R:R + B * w].copy_(step.block_tables_Bw.reshape(-1))
        # Rows past B get zeros, and the static table keeps its old entries: bucket B's graph
        # reads neither.
        self._flat[:num_words].copy_(host, non_blocking=True)
        self.block_tables_RW[:B, :w].copy_(self._staging[:B * w].view(B, w))

    def token_ids(self, bucket: int) -> torch.Tensor:
        return self.token_ids_R[:bucket]

    def metadata(self, bucket: int) -> AttentionMetadata:
        """Attention metadata of a `bucket`-row decode step whose tensors are views of the buffers.

        Every call gives the same addresses, which is what a graph records. A fresh object each
        time all the same: the plain attention path caches tensors it derives (slots_SC, mask_SC)
        on the metadata, which must not outlive the step they were derived from. Its extents say
        only the shape (one new token per row); the contents are in the buffers.
        """
        if not 0 < bucket <= self.shape.max_batch:
            raise ValueError(f"bucket {bucket} is outside 1..{self.shape.max_batch}")
        return AttentionMetadata(
            extents=tuple(SeqExtent(0, 1, ()) for _ in range(bucket)),
            block_size=self.shape.block_size,
            positions_T=self.positions_R[:bucket],
            slot_mapping_T=self.slot_mapping_R[:bucket],
            query_starts=tuple(range(bucket)),
            decode=DecodeBatch(
                rows_S=self.rows_R[:bucket], block_tables_SB=self.block_tables_RW[:bucket],
                context_lens_S=self.context_lens_R[:bucket],
                # The plain path's padded width (the Triton kernel reads only the lengths).
                max_context_len=self.shape.max_context_len, block_size=self.shape.block_size,
            ),
            prefill=(),
        )


def _all_padding(shape: DecodeGraphShape) -> PaddedDecodeStep:
    R = shape.max_batch
    return PaddedDecodeStep(
        token_ids_B=torch.zeros(R, dtype=torch.long), positions_B=torch.zeros(R, dtype=torch.long),
        slot_mapping_B=torch.full((R,), shape.scratch_slot, dtype=torch.long),
        context_lens_B=torch.zeros(R, dtype=torch.int32),
        block_tables_Bw=torch.full((R, 1), shape.scratch_block, dtype=torch.int32),
    )


def _int_tensor(typecode: str, values) -> torch.Tensor:
    # Through an array, as AttentionMetadata does: several times faster than torch.tensor on a list.
    buf = array.array(typecode, values)
    dtype = torch.long if typecode == "q" else torch.int32
    return torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
