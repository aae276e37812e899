"""Per step: exact or low-latency dispatch? A pure rule over the step's batches.

Low-latency dispatch (workers/moe/low_latency_dispatch.py) saves a counts exchange and a host read
per MoE layer but moves fixed-capacity buffers: tokens × min(K, C) rows per (attention worker,
expert worker) pair, mostly padding once the step is large. So it pays for small steps and
costs for large ones. Prefill steps always go exact: their token counts are large and
uneven, and padding every rank to the largest chunk would multiply the bytes moved.

    low-latency  every sequence in the step is a decode (one new token) and no attention worker
                 has more than `max_tokens` of them; the buffers are sized for the most any has
    exact        otherwise, or `max_tokens` 0 (off), or nothing to run
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from workers.model.batch_spec import ScheduledBatch


def low_latency_tokens(batches: Sequence[ScheduledBatch], max_tokens: int) -> int | None:
    """The buffers' size in tokens for a low-latency step, or None for the exact path."""
    if max_tokens <= 0:
        return None
    if any(s.num_new_tokens != 1 for b in batches for s in b.seqs):
        return None
    most = max((b.num_tokens for b in batches), default=0)
    return most if 0 < most <= max_tokens else None


def with_dispatch_mode(batches: tuple[ScheduledBatch, ...], max_tokens: int) -> tuple[ScheduledBatch, ...]:
    """The same batches, each told the step's mode (every worker must agree on it)."""
    tokens = low_latency_tokens(batches, max_tokens)
    if tokens is None:
        return batches
    return tuple(dataclasses.replace(b, low_latency_tokens=tokens) for b in batches)
