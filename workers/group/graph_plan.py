"""Which decode steps of a model group replay CUDA graphs: decided once for the group, the same on
every rank. Pure functions of plain values.

In a group every rank's graph holds its MoE layers' all-to-alls, and a collective recorded in a
graph must meet the same collective, with the same sizes, on every other rank when it replays.
So the group agrees on everything shape-giving before any rank captures:

- the batch sizes (buckets) to capture, from the engine config: decode steps small enough for
  low-latency dispatch (its fixed-capacity buffers and statically known splits are what make the
  all-to-all capturable; the exact path reads counts on the host) and at most max_num_seqs;
- per step, the bucket: the smallest captured one holding the step's `low_latency_tokens` (the
  most decode tokens on any attention worker, sent with the step to every rank); every rank's
  low-latency buffers are then sized for the bucket, whether it replays or runs eagerly, so an
  attention worker whose step cannot replay (no Triton kernel there) still meets the others.

Only with the nccl backend on CUDA: gloo collectives cannot be captured, and "staged" ones copy
through host memory. `enforce_eager` turns graphs off everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from workers.model.cuda_graph_buckets import DEFAULT_BUCKET_SIZES, bucket_for, decode_buckets


@dataclass(frozen=True)
class DecodeGraphPlan:
    """What every rank of a group captures (crosses the actor boundary)."""

    buckets: tuple[int, ...] = ()  # ascending; () every step runs eagerly
    why_eager: str = ""  # when `buckets` is empty: why (for the log line)

    def __post_init__(self) -> None:
        if list(self.buckets) != sorted(set(self.buckets)) or any(b < 1 for b in self.buckets):
            raise ValueError(f"buckets must be distinct, ascending and >= 1, got {self.buckets}")

    @property
    def enabled(self) -> bool:
        return bool(self.buckets)


def decode_graph_plan(*, backend: str, enforce_eager: bool, max_num_seqs: int, low_latency_max_tokens: int,
                      sizes: Iterable[int] = DEFAULT_BUCKET_SIZES) -> DecodeGraphPlan:
    """The group's plan: `backend` the process group's (collective_backend.choose_backend),
    the rest from the engine config (max_num_seqs per attention worker)."""
    if enforce_eager:
        return DecodeGraphPlan(why_eager="enforce_eager")
    if backend != "nccl":
        return DecodeGraphPlan(why_eager=f"the {backend} backend's collectives cannot be captured "
                                         "in a CUDA graph (nccl only)")
    if low_latency_max_tokens <= 0:
        return DecodeGraphPlan(why_eager="low-latency dispatch is off (low_latency_max_tokens 0, or a "
                                         "capacity factor): exact dispatch reads counts on the host")
    return DecodeGraphPlan(buckets=decode_buckets(min(max_num_seqs, low_latency_max_tokens), sizes))


def group_step_bucket(low_latency_tokens: int | None, captured: Sequence[int]) -> int | None:
    """The bucket every rank runs this step in, or None (every rank eager, as without graphs).
    `captured`: the buckets the whole group captured (the same list on every rank)."""
    if low_latency_tokens is None:
        return None  # an exact step: prefill, or too large for low-latency dispatch
    return bucket_for(low_latency_tokens, captured)


def dispatch_tokens(low_latency_tokens: int | None, captured: Sequence[int]) -> int | None:
    """The low-latency buffers' size this step, in tokens per attention worker: the step's bucket
    when it has one (graph or not, every rank sizes them alike), else the step's own count."""
    bucket = group_step_bucket(low_latency_tokens, captured)
    return bucket if bucket is not None else low_latency_tokens
