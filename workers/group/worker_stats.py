"""What a worker reports about itself for the metrics exporter (drained on each read)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.moe.a2a_dispatcher import DispatchStatsSnapshot


@dataclass(frozen=True)
class WorkerStats:
    rank: int
    kind: str  # "attention" | "expert"
    dispatch: DispatchStatsSnapshot
    busy_seconds: float  # expert workers: time inside grouped experts; attention workers: whole steps
    num_steps: int
