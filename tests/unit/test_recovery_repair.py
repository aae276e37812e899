"""Which faults a one-worker repair handles, and the engine's side of it: no Ray."""

from __future__ import annotations

import asyncio

import pytest

from cluster.recovery import Recovery, kv_lost
from cluster.worker_fault import WorkerFault
from cluster.worker_repair import repairable


def fault(cause: str = "died", kind: str = "expert", rank: int | None = 2) -> WorkerFault:
    return WorkerFault(cause, rank, kind, "injected")


def test_only_a_dead_expert_worker_with_step_loops_is_repaired_alone():
    assert repairable(fault(), has_step_loops=True)
    assert not repairable(fault(), has_step_loops=False)  # nothing tells that the survivors are idle
    assert not repairable(fault(kind="attention", rank=0), has_step_loops=True)  # its KV cache is gone
    assert not repairable(fault(cause="stalled"), has_step_loops=True)  # peers may sit in a collective
    assert not repairable(fault(cause="collective_error"), has_step_loops=True)
    assert not repairable(fault(cause="stalled", kind="unknown", rank=None), has_step_loops=True)


def test_kv_is_lost_only_when_an_attention_worker_restarted():
    assert not kv_lost(("expert",))
    assert kv_lost(("attention", "expert", "expert"))
    assert kv_lost(("attention",))


class FakeExecutor:
    num_attention_workers = 1

    def __init__(self, answer) -> None:
        self.answer = answer

    async def recover(self, fault, timeout_s):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def recover(answer) -> tuple[list, list, list, Recovery]:
    recovery = Recovery()
    events, requeues, failures = [], [], []
    recovery.listeners.append(events.append)

    def requeue_running() -> int:
        requeues.append(1)
        return 7

    asyncio.run(recovery.recover(fault(), FakeExecutor(answer), requeue_running=requeue_running,
                                 fail_all=failures.append))
    return events, requeues, failures, recovery


def test_a_one_worker_repair_requeues_nothing():
    events, requeues, failures, recovery = recover(("expert",))
    (event,) = events
    assert (event.outcome, event.restarted_kinds, event.num_requeued) == ("recovered", ("expert",), 0)
    assert requeues == [] and failures == [] and recovery.healthy and recovery.num_recoveries == 1


def test_a_group_restart_requeues_every_running_sequence():
    events, requeues, failures, _ = recover(("attention", "expert", "expert"))
    (event,) = events
    assert (event.outcome, event.num_requeued) == ("recovered", 7) and requeues == [1] and failures == []


@pytest.mark.parametrize("error", [TimeoutError("late"), RuntimeError("no bundle")])
def test_a_failed_recovery_requeues_then_fails_every_request(error):
    events, requeues, failures, recovery = recover(error)
    (event,) = events
    assert (event.outcome, event.num_requeued) == ("failed", 7) and requeues == [1]
    assert failures == [recovery.unhealthy_reason] and not recovery.healthy
