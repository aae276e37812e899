"""The step's decode batch and prefill chunks against a per-sequence reference."""

from __future__ import annotations

import random

import pytest
import torch

from workers.model.attention_metadata import AttentionMetadata, SeqExtent, context_slots, visible_mask

BLOCK = 4


def random_step(seed: int) -> list[SeqExtent]:
    """Decode tokens and prefill chunks mixed, shuffled block tables, some longer than needed."""
    rng = random.Random(seed)
    blocks = list(range(200))
    rng.shuffle(blocks)
    extents = []
    for _ in range(rng.randint(1, 12)):
        start = rng.randint(0, 30)
        query = 1 if rng.random() < 0.6 else rng.randint(2, 9)
        need = -(-(start + query) // BLOCK) + rng.randint(0, 2)
        extents.append(SeqExtent(start, query, tuple(blocks[:need])))
        blocks = blocks[need:]
    return extents


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("sliding_window", [None, 1, 5])
def test_decode_batch_matches_per_sequence(seed, sliding_window):
    extents = random_step(seed)
    meta = AttentionMetadata.build(extents, BLOCK)
    decode = meta.decode_batch(sliding_window)
    seqs = [i for i, e in enumerate(extents) if e.query_len == 1]
    if not seqs:
        assert decode is None
        return
    assert decode.rows_S.tolist() == [meta.query_starts[i] for i in seqs]
    for s, i in enumerate(seqs):
        ext = extents[i]
        visible = decode.mask_SC[s]
        ref_mask = visible_mask(torch.tensor([ext.context_len - 1]), torch.arange(ext.context_len),
                                sliding_window)[0]
        assert torch.equal(visible[: ext.context_len], ref_mask)
        assert not visible[ext.context_len:].any()
        slots = context_slots(ext.block_table, ext.context_len, BLOCK)
        assert torch.equal(decode.slots_SC[s, : ext.context_len], slots)
        new_token_slot = decode.slots_SC[s, ext.context_len - 1]
        assert torch.equal(new_token_slot, meta.slot_mapping_T[meta.query_starts[i]])


@pytest.mark.parametrize("seed", range(10))
def test_prefill_chunks_match_per_sequence(seed):
    extents = random_step(seed)
    meta = AttentionMetadata.build(extents, BLOCK)
    chunks = meta.prefill_chunks(3)
    prefills = [i for i, e in enumerate(extents) if e.query_len > 1]
    assert len(chunks) == len(prefills)
    for chunk, i in zip(chunks, prefills, strict=True):
        ext, start = extents[i], meta.query_starts[i]
        assert chunk.rows == slice(start, start + ext.query_len)
        assert torch.equal(chunk.slots_C[ext.start_pos:], meta.slot_mapping_T[chunk.rows])
        ref_mask = visible_mask(meta.positions_T[chunk.rows], torch.arange(ext.context_len), 3)
        assert torch.equal(chunk.mask_LC, ref_mask)


def test_built_once_per_step():
    meta = AttentionMetadata.build([SeqExtent(5, 1, (0, 1)), SeqExtent(0, 3, (2,))], BLOCK)
    assert meta.decode_batch(None) is meta.decode_batch(None)
    assert meta.prefill_chunks(None) is meta.prefill_chunks(None)
    assert meta.decode_batch(2) is not meta.decode_batch(None)


def legacy_build(extents: list[SeqExtent], block_size: int):
    """The construction before the metadata moved to one host buffer: a loop per token, a loop
    per prefill chunk, dense masks built at once. The new one must give the same tensors."""
    positions, slots, starts = [], [], []
    for ext in extents:
        starts.append(len(positions))
        for pos in range(ext.start_pos, ext.context_len):
            positions.append(pos)
            slots.append(ext.block_table[pos // block_size] * block_size + pos % block_size)
    positions_T = torch.tensor(positions, dtype=torch.long)
    decode_seqs = [i for i, e in enumerate(extents) if e.query_len == 1]
    decode = {}
    if decode_seqs:
        dec = [extents[i] for i in decode_seqs]
        ctx_S = torch.tensor([e.context_len for e in dec], dtype=torch.long)
        max_ctx = int(ctx_S.max())
        num_blocks = -(-max_ctx // block_size)
        tables_SB = torch.tensor(
            [list(e.block_table[:num_blocks]) + [0] * (num_blocks - len(e.block_table[:num_blocks]))
             for e in dec], dtype=torch.long)
        pos_C = torch.arange(max_ctx)
        decode = {
            "rows_S": torch.tensor([starts[i] for i in decode_seqs], dtype=torch.long),
            "slots_SC": tables_SB[:, pos_C // block_size] * block_size + pos_C % block_size,
            "mask": lambda w: visible_mask(ctx_S[:, None] - 1, pos_C, w)[:, 0, :] & (pos_C < ctx_S[:, None]),
        }
    prefill = [
        (slice(starts[i], starts[i] + e.query_len), context_slots(e.block_table, e.context_len, block_size),
         lambda w, i=i, e=e: visible_mask(positions_T[starts[i]: starts[i] + e.query_len],
                                          torch.arange(e.context_len), w))
        for i, e in enumerate(extents) if e.query_len > 1
    ]
    return positions_T, torch.tensor(slots, dtype=torch.long), tuple(starts), decode, prefill


@pytest.mark.parametrize("seed", range(30))
def test_equals_the_legacy_construction(seed):
    extents = random_step(seed)
    meta = AttentionMetadata.build(extents, BLOCK, device="cpu")
    positions_T, slots_T, starts, decode, prefill = legacy_build(extents, BLOCK)
    assert torch.equal(meta.positions_T, positions_T)
    assert torch.equal(meta.slot_mapping_T, slots_T)
    assert meta.query_starts == starts
    for window in (None, 1, 5):
        batch = meta.decode_batch(window)
        assert (batch is None) == (not decode)
        if batch is not None:
            assert torch.equal(batch.rows_S, decode["rows_S"])
            # Padding past a context may point anywhere real; only visible slots must agree.
            mask = decode["mask"](window)
            assert torch.equal(batch.mask_SC, mask)
            assert torch.equal(batch.slots_SC[mask], decode["slots_SC"][mask])
        chunks = meta.prefill_chunks(window)
        assert len(chunks) == len(prefill)
        for chunk, (rows, slots_C, mask_fn) in zip(chunks, prefill, strict=True):
            assert chunk.rows == rows
            assert torch.equal(chunk.slots_C, slots_C)
            assert torch.equal(chunk.mask_LC, mask_fn(window))


def test_what_the_paged_kernel_reads():
    """int32 block tables padded to the longest decode context, int32 context lengths."""
    tables = [(7, 3, 9, 1), (5,), (2, 8, 4)]
    extents = [SeqExtent(12, 1, tables[0]), SeqExtent(0, 3, tables[1]), SeqExtent(3, 1, tables[1]),
               SeqExtent(8, 1, tables[2])]
    decode = AttentionMetadata.build(extents, BLOCK).decode_batch(None)
    assert decode.block_tables_SB.dtype == torch.int32
    assert decode.context_lens_S.dtype == torch.int32
    assert decode.block_tables_SB.tolist() == [[7, 3, 9, 1], [5, 0, 0, 0], [2, 8, 4, 0]]
    assert decode.context_lens_S.tolist() == [13, 4, 9]
    assert decode.max_context_len == 13
    assert decode.rows_S.tolist() == [0, 4, 5]


def test_one_buffer_per_step():
    """Every index tensor is a view of one buffer: on a GPU, one host-to-device copy per step."""
    extents = [SeqExtent(5, 1, (0, 1)), SeqExtent(0, 6, (2, 3)), SeqExtent(9, 1, (4, 5, 6))]
    meta = AttentionMetadata.build(extents, BLOCK)
    decode = meta.decode_batch(None)
    tensors = [meta.positions_T, meta.slot_mapping_T, decode.rows_S, decode.block_tables_SB,
               decode.context_lens_S] + [c.slots_C for c in meta.prefill_chunks(None)]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1


def test_empty_step():
    """A worker with nothing scheduled still runs its layers (the MoE all-to-all needs it)."""
    meta = AttentionMetadata.build([], BLOCK)
    assert meta.num_tokens == 0 and meta.num_seqs == 0
    assert meta.decode_batch(None) is None
    assert meta.prefill_chunks(None) == ()


def test_block_table_too_short():
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.build([SeqExtent(4, 1, (0,))], BLOCK)


@pytest.mark.parametrize(("context_len", "window", "covers"),
                         [(9, None, True), (9, 9, True), (9, 10, True), (10, 9, False), (2, 1, False)])
def test_window_covers_context(context_len, window, covers):
    meta = AttentionMetadata.build([SeqExtent(context_len - 2, 2, (0, 1, 2))], BLOCK)
    chunk = meta.prefill_chunks(window)[0]
    assert chunk.window_covers_context == covers
    # Where it covers, the window cuts nothing out of the causal mask.
    causal = visible_mask(chunk.positions_L, torch.arange(context_len), None)
    assert torch.equal(chunk.mask_LC, causal) == covers
