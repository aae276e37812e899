"""The step's decode batch and prefill chunks against a per-sequence reference."""

from __future__ import annotations

import random

import pytest
import torch

from workers.attention_metadata import AttentionMetadata, SeqExtent, context_slots, visible_mask

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
