"""How the engine runs a step: one ScheduledBatch per attention worker in, one StepOutput each out.

`LocalExecutor` runs the single-process model in a thread so the engine's event loop stays
free to accept and stream requests while a step computes. `RayExecutor`
(cluster/ray_executor.py) implements the same members over a model group of Ray actors; only
it has workers that can fail (`WorkerFailed` from `execute`), and `recover` replaces them.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from cluster.recovery_event import Repair
from cluster.worker_fault import WorkerFault
from workers.model.batch_spec import ScheduledBatch
from workers.model.runner import ModelRunner
from workers.model.step_output import StepOutput


class Executor(Protocol):
    num_attention_workers: int

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> tuple[StepOutput, ...]: ...

    async def recover(self, fault: WorkerFault, timeout_s: float) -> Repair:
        """Replace failed workers within timeout_s; says what was replaced and which KV caches were lost."""
        ...


class LocalExecutor:
    num_attention_workers = 1

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> tuple[StepOutput, ...]:
        (batch,) = batches
        return (await asyncio.to_thread(self.runner.execute, batch),)

    async def recover(self, fault: WorkerFault, timeout_s: float) -> Repair:
        raise RuntimeError("the single-process executor has no workers to recover")
