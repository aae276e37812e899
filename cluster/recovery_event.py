"""What the engine reports after each worker fault: for logs, metrics and tests."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.worker_fault import WorkerFault

OUTCOMES = ("recovered", "failed", "refused")  # refused: the recovery policy said no
# What a recovery replaced: one expert worker (every KV cache kept), one attention worker (only its
# own sequences prefill again), or the whole group (every sequence prefills again).
REPAIRS = ("expert_worker", "attention_worker", "group")


@dataclass(frozen=True)
class Repair:
    """What an executor's `recover` replaced (cluster/ray_executor.py)."""

    kind: str  # one of REPAIRS
    restarted_kinds: tuple[str, ...]  # "attention" | "expert", one per new worker
    lost_kv_ranks: tuple[int, ...] = ()  # attention ranks that lost their KV cache: their sequences prefill

    def __post_init__(self) -> None:
        if self.kind not in REPAIRS:
            raise ValueError(f"kind must be one of {REPAIRS}, got {self.kind!r}")


@dataclass(frozen=True)
class RecoveryEvent:
    fault: WorkerFault
    outcome: str  # one of OUTCOMES
    seconds: float  # fault seen → workers back (or given up)
    # One entry per restarted worker, "attention" | "expert": ("expert",) when a dead expert worker
    # was repaired alone (cluster/worker_repair.py), one per rank when the whole group restarted.
    restarted_kinds: tuple[str, ...] = ()
    num_requeued: int = 0  # sequences that lost their KV cache and prefill again
    error: str | None = None  # why recovery failed or was refused
    repair: str | None = None  # one of REPAIRS when recovered
