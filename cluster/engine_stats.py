"""What the engine reports about itself: to its step listeners after every step, and on demand
(metrics, admission, readiness)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.recovery import Recovery
    from cluster.scheduler import Scheduler


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_preemptions: int  # since start
    num_steps: int
    last_step_tokens: int
    last_step_seconds: float
    num_generated_tokens: int  # since start
    num_worker_faults: int = 0  # since start: steps that failed because of a worker
    num_recoveries: int = 0  # since start: faults the engine recovered from
    healthy: bool = True  # False once a fault could not be recovered (the engine fails everything)


@dataclass
class StepCounters:
    """What the step loop counts since start; the engine owns one and updates it every step."""

    num_steps: int = 0
    last_step_tokens: int = 0
    last_step_seconds: float = 0.0
    num_generated_tokens: int = 0

    def step_ran(self, num_tokens: int, seconds: float) -> None:
        self.num_steps += 1
        self.last_step_tokens = num_tokens
        self.last_step_seconds = seconds


def collect_stats(schedulers: Sequence[Scheduler], num_kv_blocks: int, steps: StepCounters,
                  recovery: Recovery) -> EngineStats:
    """One snapshot over every attention worker's scheduler (`num_kv_blocks` each)."""
    return EngineStats(
        num_running=sum(s.num_running for s in schedulers),
        num_waiting=sum(s.num_waiting for s in schedulers),
        num_kv_blocks_used=sum(s.block_manager.num_used_blocks for s in schedulers),
        num_kv_blocks_total=num_kv_blocks * len(schedulers),
        num_preemptions=sum(s.num_preemptions for s in schedulers),
        num_steps=steps.num_steps,
        last_step_tokens=steps.last_step_tokens,
        last_step_seconds=steps.last_step_seconds,
        num_generated_tokens=steps.num_generated_tokens,
        num_worker_faults=recovery.num_worker_faults,
        num_recoveries=recovery.num_recoveries,
        healthy=recovery.healthy,
    )
