"""A worker's dispatch statistics when some of its steps are CUDA-graph replays.

The dispatcher records what each dispatch and combine moved (DispatchStats) from Python, and a
replayed step runs no Python: its statistics must be recorded by the graph itself or not at all.
So while a bucket's step is captured, dispatches record into this object differently:

- rows received per local expert are added, by an op the graph records, into `counts_LC`, a
  device buffer that outlives every graph: each replay adds its own counts, with no host read;
- the bytes each dispatch and combine move are fixed for the bucket (fixed-capacity buffers), so
  they are noted once, at capture, and multiplied by the replays counted on the host.

`snapshot_and_reset` folds both into the ordinary snapshot: one host read of `counts_LC` per
snapshot, none per step. Time spent in a replay is not split by stage: dispatch and combine
seconds count eager steps only.

Shapes: L layers, C most local experts any layer has on this rank.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from workers.comm.transport import Transfer
from workers.moe.a2a_dispatcher import DispatchStats, DispatchStatsSnapshot


@dataclass
class _BucketTraffic:
    """What one replay of a bucket's step moves, noted when it is captured."""

    num_dispatches: int = 0
    dispatch: Transfer = field(default_factory=Transfer)
    combine: Transfer = field(default_factory=Transfer)


class ReplayStats(DispatchStats):
    def __init__(self, local_expert_ids: list[tuple[int, ...]], device: torch.device) -> None:
        """`local_expert_ids[layer]`: this rank's experts of each layer, in slot order."""
        super().__init__()
        self.local_expert_ids = local_expert_ids
        max_local = max((len(ids) for ids in local_expert_ids), default=0)
        self.counts_LC = torch.zeros(len(local_expert_ids), max(max_local, 1), dtype=torch.int64,
                                     device=device)
        self._traffic: dict[int, _BucketTraffic] = {}
        self._replays: collections.Counter[int] = collections.Counter()
        self._recording: _BucketTraffic | None = None  # the bucket whose step is running as a graph would
        self._noted = False  # whether its bytes were already noted (the first run is the capture)

    @contextlib.contextmanager
    def recording(self, bucket: int) -> Iterator[None]:
        """Within: the step of `bucket` runs as its graph records it (see the module docstring)."""
        first = bucket not in self._traffic
        self._recording = self._traffic.setdefault(bucket, _BucketTraffic())
        self._noted = not first
        try:
            yield
        finally:
            self._recording = None

    def record_replay(self, bucket: int) -> None:
        """One replay of `bucket`'s graph ran (its counts are already in `counts_LC`)."""
        self._replays[bucket] += 1

    def record_dispatch_on_device(self, layer: int, local_expert_ids: tuple[int, ...],
                                  expert_counts_E: torch.Tensor, transfer: Transfer, seconds: float) -> None:
        traffic = self._recording
        if traffic is None:
            super().record_dispatch_on_device(layer, local_expert_ids, expert_counts_E, transfer, seconds)
            return
        if local_expert_ids:
            self.counts_LC[layer, :len(local_expert_ids)].add_(expert_counts_E)
        if not self._noted:
            traffic.num_dispatches += 1
            traffic.dispatch = traffic.dispatch + Transfer(transfer.bytes_sent, transfer.bytes_received)

    def record_dispatch(self, *args, **kwargs) -> None:
        if self._recording is not None:
            raise RuntimeError("an exact dispatch inside a graph's step: only low-latency dispatch replays")
        super().record_dispatch(*args, **kwargs)

    def record_combine(self, transfer: Transfer, seconds: float) -> None:
        traffic = self._recording
        if traffic is None:
            super().record_combine(transfer, seconds)
        elif not self._noted:
            traffic.combine = traffic.combine + Transfer(transfer.bytes_sent, transfer.bytes_received)

    def discard(self) -> None:
        """Forget everything recorded so far (the capture's warm-ups), keeping what was noted."""
        super().snapshot_and_reset()
        self._replays.clear()
        self.counts_LC.zero_()

    def snapshot_and_reset(self) -> DispatchStatsSnapshot:
        counts = self.counts_LC.tolist()  # the one host read of the replays' counts
        with torch.inference_mode():  # the buffer was made in the capture's inference mode
            self.counts_LC.zero_()
        tokens = {(layer, e): n for layer, ids in enumerate(self.local_expert_ids)
                  for e, n in zip(ids, counts[layer], strict=False) if n}
        self.add_counted_elsewhere(tokens, 0, Transfer(), Transfer())
        for bucket, n in self._replays.items():
            traffic = self._traffic[bucket]
            self.add_counted_elsewhere({}, n * traffic.num_dispatches, _times(traffic.dispatch, n),
                                       _times(traffic.combine, n))
        self._replays.clear()
        return super().snapshot_and_reset()


def _times(t: Transfer, n: int) -> Transfer:
    return Transfer(t.bytes_sent * n, t.bytes_received * n, t.seconds * n)
