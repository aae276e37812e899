"""Block tables patched across steps (IncrementalTables) equal tables built from scratch every step
(StepTables.build, the reference), and so does the metadata derived from them, after any sequence of
steps: admissions, chunked prefill, decodes, finishes, preemptions (blocks freed, the sequence
prefilled again into other blocks), sequences skipped for a step, reordered steps, and a step run
twice (a fault's re-run)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.model.attention_metadata import AttentionMetadata, SeqExtent, StepTables
from workers.model.incremental_tables import IncrementalTables

P = 4
NUM_BLOCKS = 96


class Sim:
    """A scheduler's worth of bookkeeping: sequences with block tables from a shuffled free list."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.free = list(range(NUM_BLOCKS))
        self.rng.shuffle(self.free)
        self.next_id = 0
        self.running: dict[int, dict] = {}  # seq_id → {"computed", "prompt", "table"}
        self.waiting: dict[int, dict] = {}  # preempted, oldest first

    def admit(self, prompt_len: int) -> None:
        self.running[self.next_id] = {"computed": 0, "prompt": prompt_len, "table": []}
        self.next_id += 1

    def release(self, seq_id: int, preempt: bool) -> None:
        seq = self.running.pop(seq_id)
        self.free += seq["table"]
        if preempt:  # back to waiting with nothing computed; re-admitted later
            seq["computed"], seq["table"] = 0, []
            self.waiting[seq_id] = seq

    def readmit(self) -> None:
        if self.waiting:
            seq_id = next(iter(self.waiting))
            self.running[seq_id] = self.waiting.pop(seq_id)

    def step(self, skip: set[int], shuffle: bool) -> tuple[list[int], list[SeqExtent]]:
        ids, extents = [], []
        for seq_id, seq in self.running.items():
            if seq_id in skip:
                continue
            left = seq["prompt"] - seq["computed"]
            new = 1 if left <= 0 else self.rng.randint(1, left)
            need = -(-(seq["computed"] + new) // P)
            while len(seq["table"]) < need and self.free:
                seq["table"].append(self.free.pop())
            if len(seq["table"]) < need:
                continue  # no room this step
            ids.append(seq_id)
            extents.append(SeqExtent(seq["computed"], new, tuple(seq["table"])))
        if shuffle:
            order = list(range(len(ids)))
            self.rng.shuffle(order)
            ids, extents = [ids[i] for i in order], [extents[i] for i in order]
        return ids, extents

    def advance(self, ids: list[int], extents: list[SeqExtent]) -> None:
        for seq_id, e in zip(ids, extents, strict=True):
            self.running[seq_id]["computed"] = e.context_len


def assert_same(inc: StepTables, ref: StepTables, extents: list[SeqExtent]) -> None:
    assert torch.equal(inc.start_pos_M, ref.start_pos_M)
    assert torch.equal(inc.query_lens_M, ref.query_lens_M)
    assert inc.tables_MB.dtype == ref.tables_MB.dtype and torch.equal(inc.tables_MB, ref.tables_MB)
    got = AttentionMetadata.from_tables(extents, inc, P)
    want = AttentionMetadata.build(extents, P)
    assert torch.equal(got.positions_T, want.positions_T)
    assert torch.equal(got.slot_mapping_T, want.slot_mapping_T)
    assert got.query_starts == want.query_starts
    assert (got.decode is None) == (want.decode is None)
    if want.decode is not None:
        for name in ("rows_S", "block_tables_SB", "context_lens_S"):
            assert torch.equal(getattr(got.decode, name), getattr(want.decode, name)), name
        assert got.decode.max_context_len == want.decode.max_context_len
    assert len(got.prefill) == len(want.prefill)
    for g, w in zip(got.prefill, want.prefill, strict=True):
        assert (g.rows, g.context_len) == (w.rows, w.context_len)
        assert torch.equal(g.slots_C, w.slots_C) and torch.equal(g.positions_L, w.positions_L)


OPS = st.sampled_from(["admit", "admit", "finish", "preempt", "readmit", "skip", "shuffle", "rerun",
                       "decode", "decode", "decode"])


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**16), ops=st.lists(OPS, min_size=1, max_size=40))
def test_patched_tables_equal_a_fresh_build_after_any_steps(seed, ops):
    sim = Sim(seed)
    tables = IncrementalTables(P)
    rng = random.Random(seed + 1)
    for op in ops:
        skip, shuffle = set(), False
        if op == "admit":
            sim.admit(rng.randint(1, 14))
        elif op in ("finish", "preempt") and sim.running:
            sim.release(rng.choice(list(sim.running)), preempt=op == "preempt")
        elif op == "readmit":
            sim.readmit()
        elif op == "skip" and sim.running:
            skip = {rng.choice(list(sim.running))}
        shuffle = op == "shuffle"
        ids, extents = sim.step(skip, shuffle)
        assert_same(tables.update(ids, extents), StepTables.build(extents, P), extents)
        if op == "rerun":  # the same step again, as after a fault: nothing may advance twice
            assert_same(tables.update(ids, extents), StepTables.build(extents, P), extents)
        sim.advance(ids, extents)


def decode_run(num_seqs: int, steps: int) -> tuple[IncrementalTables, list]:
    tables = IncrementalTables(P)
    seqs = [[10 * i + b for b in range(8)] for i in range(num_seqs)]
    ids = list(range(num_seqs))
    for t in range(steps):
        extents = [SeqExtent(3 + t, 1, tuple(s)) for s in seqs]
        assert_same(tables.update(ids, extents), StepTables.build(extents, P), extents)
    return tables, seqs


def test_a_decode_step_writes_no_whole_row():
    """Steady decoding: each sequence's row is written once, then only patched (a block every P steps)."""
    tables, _ = decode_run(num_seqs=5, steps=3 * P)
    assert tables.num_rows_written == 5


def test_a_table_changed_underneath_is_rewritten_not_read_stale():
    tables, seqs = decode_run(num_seqs=3, steps=2)  # contexts 5 → blocks 0..1 in use
    changed = (seqs[1][0], 999) + tuple(seqs[1][2:])  # its last block in use replaced
    extents = [SeqExtent(5, 1, tuple(seqs[0])), SeqExtent(5, 1, changed), SeqExtent(5, 1, tuple(seqs[2]))]
    written = tables.num_rows_written
    got = tables.update([0, 1, 2], extents)
    assert torch.equal(got.tables_MB, StepTables.build(extents, P).tables_MB)
    assert tables.num_rows_written == written + 1


def test_rows_are_reused_after_sequences_leave():
    tables = IncrementalTables(P)
    for first in range(0, 40, 4):  # four new sequences every step, the old four gone
        ids = list(range(first, first + 4))
        extents = [SeqExtent(0, 3, (i % NUM_BLOCKS,)) for i in ids]
        tables.update(ids, extents)
    assert tables._tables_RW.shape[0] == 8  # the first allocation, never grown


def test_refuses_what_a_fresh_build_refuses():
    tables = IncrementalTables(P)
    with pytest.raises(ValueError, match="cannot hold"):
        tables.update([0], [SeqExtent(4, 1, (0,))])
    with pytest.raises(ValueError, match="twice"):
        IncrementalTables(P).update([0, 0], [SeqExtent(0, 1, (0,)), SeqExtent(0, 1, (1,))])
