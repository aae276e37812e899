"""The step's block tables kept on the host across steps, patched instead of rebuilt.

Building every row of every sequence's block table each step (`StepTables.build`) costs
O(sequences × blocks) of Python: at 256 decoding sequences of a few hundred tokens that is
most of a step's host work. Yet from one decode step to the next a sequence only moves one
position on, and gains one block when it crosses a block boundary. So each sequence keeps a
row of a persistent table here, and a step

  - finds each sequence's row (the same rows as last step: no lookup at all),
  - appends the blocks a row's context grew into (for a decode: one block, every P steps),
  - writes whole rows only for sequences it has not seen continue: new ones, and any that does
    not start where it stopped (preempted and prefilled again, a step re-run after a fault),
  - frees the rows of sequences gone from the step (finished, aborted, preempted),

then hands out the step's rows in its order with one gather. The result equals
`StepTables.build` on the same extents (tests/unit/test_incremental_tables.py checks it
over random admit / decode / finish / preempt sequences).

What it relies on, as the block manager (cluster/block_manager.py) guarantees: a running
sequence's table only grows at its end; a preempted one frees all of it and restarts at 0.
The last block each row uses is checked against the step's table all the same (one vectorised
compare): a table that changed underneath is rewritten, never read stale.

Shapes: M sequences of the step, R rows held (≥ M), W row width held, B blocks of the step's
widest context, P block size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.model.attention_metadata import SeqExtent, StepTables, _int_tensor

_NEVER = -1  # a free row's context length: no step starts there, so its next user rewrites it


class IncrementalTables:
    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._tables_RW = torch.zeros(0, 0, dtype=torch.int32)  # 0 past each row's blocks
        self._num_blocks_R = torch.zeros(0, dtype=torch.long)  # blocks of each row filled in
        self._context_lens_R = torch.zeros(0, dtype=torch.long)  # where each row's sequence stopped
        self._row_of: dict[int, int] = {}  # seq_id → row
        self._free_rows: list[int] = []
        self._seq_ids: tuple[int, ...] = ()  # last step's, in its order
        self._rows_M = torch.zeros(0, dtype=torch.long)  # last step's rows, in its order
        self.num_rows_written = 0  # whole rows written since construction (tests and benchmarks)

    def update(self, seq_ids: Sequence[int], extents: Sequence[SeqExtent]) -> StepTables:
        """This step's tables (`extents[i]` is sequence `seq_ids[i]`'s share of the step)."""
        if len(seq_ids) != len(extents):
            raise ValueError(f"{len(seq_ids)} sequence ids for {len(extents)} extents")
        P = self.block_size
        # List comprehensions into arrays: the cheapest way over M Python objects (tensor ops cost
        # a few µs each whatever their size, so there are few of them, and no loop per sequence).
        start_pos_M = _int_tensor("q", [e.start_pos for e in extents])
        query_lens_M = _int_tensor("q", [e.query_len for e in extents])
        context_lens_M = start_pos_M + query_lens_M
        need_M = torch.div(context_lens_M + (P - 1), P, rounding_mode="floor")
        needs = need_M.tolist()
        rows_M = self._rows_for(tuple(seq_ids))
        width = max(needs, default=0)
        self._reserve(width)

        last_M = _int_tensor("i", [t[n - 1] if len(t) >= n else -1
                                   for t, n in zip([e.block_table for e in extents], needs, strict=True)])
        have_M = self._num_blocks_R.index_select(0, rows_M)
        held_last_M = self._tables_RW.view(-1).index_select(
            0, rows_M * self._tables_RW.shape[1] + (torch.minimum(have_M, need_M) - 1).clamp_(min=0))
        # A row continues when its sequence starts where it stopped and still has the blocks it
        # had; anything else is written again from its first block.
        rewrite_M = (start_pos_M != self._context_lens_R.index_select(0, rows_M)) | (have_M > need_M) | (
            (have_M == need_M) & (held_last_M != last_M))
        if bool(rewrite_M.any()):
            rewritten = rows_M[rewrite_M]
            self._tables_RW.index_fill_(0, rewritten, 0)
            have_M = have_M.masked_fill(rewrite_M, 0)
            self.num_rows_written += rewritten.numel()
        self._append(extents, rows_M, have_M, needs)
        self._num_blocks_R.index_copy_(0, rows_M, need_M)
        self._context_lens_R.index_copy_(0, rows_M, context_lens_M)
        return StepTables(start_pos_M=start_pos_M, query_lens_M=query_lens_M,
                          tables_MB=self._tables_RW.narrow(1, 0, width).index_select(0, rows_M))

    def _rows_for(self, seq_ids: tuple[int, ...]) -> torch.Tensor:
        """Each sequence's row, in step order: last step's rows when the step holds the same
        sequences in the same order (the common decode step); else a lookup per sequence, rows
        for newcomers, and the rows of sequences that left freed."""
        if seq_ids == self._seq_ids:
            return self._rows_M
        row_of = self._row_of
        gone = row_of.keys() - set(seq_ids)
        if gone:
            freed = [row_of.pop(s) for s in gone]
            self._free_rows.extend(freed)
            self._context_lens_R[freed] = _NEVER
        rows = []
        for s in seq_ids:
            row = row_of.get(s)
            if row is None:
                row = row_of[s] = self._take_row()
            rows.append(row)
        if len(row_of) != len(seq_ids):
            raise ValueError("a sequence appears twice in one step")
        self._seq_ids = seq_ids
        self._rows_M = _int_tensor("q", rows)
        return self._rows_M

    def _take_row(self) -> int:
        if not self._free_rows:
            held = self._tables_RW.shape[0]
            grown = max(8, 2 * held)
            self._tables_RW = _grow(self._tables_RW, (grown, self._tables_RW.shape[1]), 0)
            self._num_blocks_R = _grow(self._num_blocks_R, (grown,), 0)
            self._context_lens_R = _grow(self._context_lens_R, (grown,), _NEVER)
            self._free_rows.extend(range(grown - 1, held - 1, -1))  # lowest first
        return self._free_rows.pop()

    def _reserve(self, width: int) -> None:
        rows, held = self._tables_RW.shape
        if width > held:
            self._tables_RW = _grow(self._tables_RW, (rows, max(width, 2 * held)), 0)

    def _append(self, extents: Sequence[SeqExtent], rows_M: torch.Tensor, have_M: torch.Tensor,
                needs: list[int]) -> None:
        """Blocks [have, need) of every row that grew, in one indexed write. Python only over the
        rows that grew: for a decode step about one sequence in P."""
        rows, cols, blocks = [], [], []
        row_list = None
        for i, (have, need) in enumerate(zip(have_M.tolist(), needs, strict=True)):
            if need <= have:
                continue
            table = extents[i].block_table
            if len(table) < need:
                raise ValueError(f"block table of {len(table)} blocks cannot hold "
                                 f"{extents[i].context_len} tokens")
            row_list = row_list or rows_M.tolist()
            rows += [row_list[i]] * (need - have)
            cols += range(have, need)
            blocks += table[have:need]
        if rows:
            self._tables_RW.index_put_((_int_tensor("q", rows), _int_tensor("q", cols)),
                                       _int_tensor("i", blocks))


def _grow(t: torch.Tensor, shape: tuple[int, ...], fill: int) -> torch.Tensor:
    out = torch.full(shape, fill, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out
