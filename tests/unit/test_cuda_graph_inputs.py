"""A decode step padded into the static buffers a graph reads (on the CPU: the same code as on CUDA)."""

from __future__ import annotations

import pytest
import torch

from workers.model.attention_metadata import AttentionMetadata, SeqExtent
from workers.model.cuda_graph_inputs import DecodeGraphInputs, DecodeGraphShape, pad_decode_step

P = 4
SHAPE = DecodeGraphShape(max_batch=8, max_blocks=6, block_size=P, scratch_block=30)
# Shuffled tables (one longer than its context needs), contexts of 1, 6 and 13 keys.
EXTENTS = [SeqExtent(0, 1, (7,)), SeqExtent(5, 1, (3, 11, 2)), SeqExtent(12, 1, (9, 1, 20, 5))]
IDS = [17, 4, 60]


def test_padded_rows_point_at_the_scratch_block_and_attend_nothing():
    step = pad_decode_step(IDS, EXTENTS, 4, SHAPE)
    assert step.num_rows == 4
    assert step.token_ids_B.tolist() == [17, 4, 60, 0]
    assert step.positions_B.tolist() == [0, 5, 12, 0]
    # slot = block_table[pos // P] * P + pos % P; padding writes the scratch block's first slot
    assert step.slot_mapping_B.tolist() == [7 * P, 11 * P + 1, 5 * P, 30 * P]
    assert step.context_lens_B.tolist() == [1, 6, 13, 0]
    assert step.context_lens_B.dtype == torch.int32 and step.block_tables_Bw.dtype == torch.int32
    # As wide as the longest context needs (13 keys: 4 blocks); past each context, the scratch block
    # (the second table's third block is not yet in its context of 6 keys).
    assert step.block_tables_Bw.tolist() == [[7, 30, 30, 30], [3, 11, 30, 30], [9, 1, 20, 5],
                                             [30, 30, 30, 30]]


def test_a_full_bucket_has_no_padding():
    step = pad_decode_step(IDS, EXTENTS, 3, SHAPE)
    assert step.context_lens_B.tolist() == [1, 6, 13]


@pytest.mark.parametrize(("ids", "extents", "bucket"), [
    (IDS, EXTENTS, 2),  # more sequences than the bucket
    (IDS, EXTENTS, 9),  # a bucket past the buffers
    (IDS[:2], EXTENTS, 4),  # ids and sequences disagree
    ([1], [SeqExtent(0, 2, (0,))], 1),  # a prefill chunk
    ([1], [SeqExtent(24, 1, tuple(range(7)))], 1),  # 25 keys: past the 6-block static table
    ([1], [SeqExtent(8, 1, (0, 1))], 1),  # a table too short for its context
])
def test_what_is_not_a_paddable_decode_step_is_refused(ids, extents, bucket):
    with pytest.raises(ValueError):
        pad_decode_step(ids, extents, bucket, SHAPE)


def test_static_metadata_equals_the_eager_metadata_on_the_real_rows():
    inputs = DecodeGraphInputs(SHAPE, torch.device("cpu"))
    inputs.write(pad_decode_step(IDS, EXTENTS, 4, SHAPE))
    got = inputs.metadata(4)
    want = AttentionMetadata.build(EXTENTS, P)
    S = len(EXTENTS)
    assert inputs.token_ids(4).tolist() == [17, 4, 60, 0]
    assert torch.equal(got.positions_T[:S], want.positions_T)
    assert torch.equal(got.slot_mapping_T[:S], want.slot_mapping_T)
    g, w = got.decode_batch(None), want.decode_batch(None)
    assert torch.equal(g.rows_S, torch.arange(4))
    assert torch.equal(g.context_lens_S[:S], w.context_lens_S)
    assert g.context_lens_S[S:].tolist() == [0]
    width = w.block_tables_SB.shape[1]
    for s, e in enumerate(EXTENTS):
        need = -(-e.context_len // P)
        assert torch.equal(g.block_tables_SB[s, :need], w.block_tables_SB[s, :need])
    assert g.block_tables_SB.shape == (4, SHAPE.max_blocks) and width <= SHAPE.max_blocks
    assert got.num_tokens == 4 and got.prefill == ()


def test_buffers_keep_their_addresses_and_take_each_new_step():
    inputs = DecodeGraphInputs(SHAPE, torch.device("cpu"))
    meta = inputs.metadata(4)
    ptrs = [meta.positions_T.data_ptr(), meta.decode.block_tables_SB.data_ptr(),
            inputs.token_ids(4).data_ptr()]
    # Before any step every row is padding: what the capture's warm-up runs on.
    assert meta.decode.context_lens_S.tolist() == [0, 0, 0, 0]
    assert meta.slot_mapping_T.tolist() == [SHAPE.scratch_slot] * 4
    inputs.write(pad_decode_step(IDS, EXTENTS, 4, SHAPE))
    # A narrower later step (one block): the table's older columns stay, and are never read.
    inputs.write(pad_decode_step([8, 9], [SeqExtent(2, 1, (6,)), SeqExtent(0, 1, (12,))], 2, SHAPE))
    meta = inputs.metadata(4)
    assert [meta.positions_T.data_ptr(), meta.decode.block_tables_SB.data_ptr(),
            inputs.token_ids(4).data_ptr()] == ptrs
    small = inputs.metadata(2)
    assert inputs.token_ids(2).tolist() == [8, 9]
    assert small.positions_T.tolist() == [2, 0]
    assert small.slot_mapping_T.tolist() == [6 * P + 2, 12 * P]
    assert small.decode.context_lens_S.tolist() == [3, 1]
    assert small.decode.block_tables_SB[:, 0].tolist() == [6, 12]
    assert small.decode.block_tables_SB[1, 1:4].tolist() == [11, 30, 30]  # stale, past the context
    with pytest.raises(ValueError):
        inputs.metadata(9)
