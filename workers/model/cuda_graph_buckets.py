"""Which batch sizes decode graphs are captured at, and which captured size a step pads up to.

A CUDA graph replays the shapes it was captured with, so the decode step is captured at a few
batch sizes (buckets) and a step of S sequences runs in the smallest captured bucket ≥ S, its
extra rows padding. Powers of two keep the padding under half a batch and the number of
graphs (capture time, memory) small; the largest bucket is capped by the scheduler's
max_num_seqs, since no step can be larger.

Only a pure decode step fits a graph: every sequence brings exactly one new token (a prefill
chunk has a data-dependent length), and every context fits the static block table.

Pure functions of plain values: no torch, testable on any machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from workers.model.attention_metadata import SeqExtent

DEFAULT_BUCKET_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def decode_buckets(max_num_seqs: int, sizes: Iterable[int] = DEFAULT_BUCKET_SIZES) -> tuple[int, ...]:
    """The sizes to capture, ascending: those below the cap, then the cap itself.

    The cap is min(max_num_seqs, the largest size), so every batch the scheduler can form up
    to the largest size has a bucket (max_num_seqs 48 gives ..., 16, 32, 48).
    """
    sizes = sorted(set(sizes))
    if max_num_seqs < 1 or not sizes or sizes[0] < 1:
        raise ValueError(f"need max_num_seqs >= 1 and sizes >= 1, got {max_num_seqs} and {sizes}")
    cap = min(max_num_seqs, sizes[-1])
    return (*[s for s in sizes if s < cap], cap)


def bucket_for(num_seqs: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding `num_seqs` rows; None for an empty step or one too large."""
    if num_seqs < 1:
        return None
    return min((b for b in buckets if b >= num_seqs), default=None)


def decode_step_bucket(extents: Sequence[SeqExtent], buckets: Sequence[int],
                       max_context_len: int) -> int | None:
    """The bucket a step replays in, or None when it runs eagerly: not every sequence has one new
    token, a context is longer than the static block table holds, or no bucket is large enough."""
    if not all(e.query_len == 1 and e.context_len <= max_context_len for e in extents):
        return None
    return bucket_for(len(extents), buckets)
