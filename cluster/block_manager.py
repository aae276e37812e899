"""KV cache blocks: which are free, and which belong to which sequence.

Only accounting: the tensors live on the attention worker, which reads a sequence's
`block_table` to find its slots. A block holds `block_size` consecutive positions of one
sequence, so position p lives in slot `block_table[p // block_size] * block_size +
p % block_size`. No prefix caching: every block has exactly one owner.
"""

from __future__ import annotations

from collections import deque

from cluster.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used_block_ids: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return len(self.used_block_ids)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add so that seq has slots for its computed tokens plus num_new_tokens."""
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, needed - len(seq.block_table))

    def num_allocatable_tokens(self, seq: Sequence) -> int:
        """The most new tokens seq could get slots for right now."""
        num_slots = (len(seq.block_table) + self.num_free_blocks) * self.block_size
        return max(0, num_slots - seq.num_computed_tokens)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_missing_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        missing = self.num_missing_blocks(seq, num_new_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(
                f"sequence {seq.seq_id} needs {missing} more blocks, only {self.num_free_blocks} free"
            )
        for _ in range(missing):
            block_id = self.free_block_ids.popleft()
            self.used_block_ids.add(block_id)
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        for block_id in seq.block_table:
            if block_id not in self.used_block_ids:
                raise RuntimeError(f"block {block_id} of sequence {seq.seq_id} is already free")
            self.used_block_ids.remove(block_id)
            self.free_block_ids.append(block_id)
        seq.block_table.clear()

    def slot(self, seq: Sequence, position: int) -> int:
        block_index, offset = divmod(position, self.block_size)
        if position < 0 or block_index >= len(seq.block_table):
            raise IndexError(f"position {position} of sequence {seq.seq_id} has no block")
        return seq.block_table[block_index] * self.block_size + offset
