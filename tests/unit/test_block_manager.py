import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.block_manager import BlockManager
from cluster.sequence import Sequence


def seq(seq_id: int = 0, num_prompt: int = 5) -> Sequence:
    return Sequence(seq_id, list(range(num_prompt)))


def test_allocate_grows_the_table_to_cover_new_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(num_prompt=10)
    assert bm.num_missing_blocks(s, 10) == 3
    bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    s.num_computed_tokens = 10
    bm.allocate(s, 2)  # positions 10, 11 still fit in block 3
    assert len(s.block_table) == 3
    s.num_computed_tokens = 12
    bm.allocate(s, 1)  # position 12 opens block 4
    assert len(s.block_table) == 4 and bm.num_free_blocks == 4


def test_allocate_counts_from_num_computed_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq()
    bm.allocate(s, 4)
    bm.allocate(s, 4)  # nothing computed yet: still positions 0..3
    assert len(s.block_table) == 1


def test_can_allocate_is_exact():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq()
    assert bm.can_allocate(s, 8)
    assert not bm.can_allocate(s, 9)
    with pytest.raises(RuntimeError, match="needs 3 more blocks"):
        bm.allocate(s, 9)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_num_allocatable_tokens_counts_slack_in_the_last_block():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = seq()
    bm.allocate(s, 5)
    s.num_computed_tokens = 5
    assert bm.num_allocatable_tokens(s) == 3 * 4 - 5
    assert bm.can_allocate(s, bm.num_allocatable_tokens(s))
    assert not bm.can_allocate(s, bm.num_allocatable_tokens(s) + 1)


def test_slot_maps_positions_through_the_block_table():
    bm = BlockManager(num_blocks=4, block_size=4)
    other, s = seq(0), seq(1)
    bm.allocate(other, 4)
    bm.allocate(s, 6)
    assert s.block_table == [1, 2]
    assert [bm.slot(s, p) for p in range(6)] == [4, 5, 6, 7, 8, 9]
    with pytest.raises(IndexError):
        bm.slot(s, 8)
    with pytest.raises(IndexError):
        bm.slot(s, -1)


def test_free_returns_every_block_and_rejects_double_free():
    bm = BlockManager(num_blocks=4, block_size=2)
    s = seq()
    bm.allocate(s, 7)
    table = list(s.block_table)
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 4 and bm.num_used_blocks == 0
    bm.free(s)  # empty table: nothing to do
    s.block_table = table
    with pytest.raises(RuntimeError, match="already free"):
        bm.free(s)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (4, 0)])
def test_rejects_empty_pools(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 9), st.booleans()), max_size=60))
def test_blocks_are_owned_once_and_all_come_back(ops):
    bm = BlockManager(num_blocks=12, block_size=3)
    seqs = [seq(i) for i in range(5)]
    for i, num_new, release in ops:
        s = seqs[i]
        if release:
            bm.free(s)
            s.num_computed_tokens = 0
        elif bm.can_allocate(s, num_new):
            bm.allocate(s, num_new)
            s.num_computed_tokens += num_new
            assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
        owned = [b for s in seqs for b in s.block_table]
        assert len(owned) == len(set(owned)) == bm.num_used_blocks
        assert bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks
        assert not set(owned) & set(bm.free_block_ids)
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks
