"""Which faults a one-worker repair handles, and the engine's side of it: no Ray."""

from __future__ import annotations

import asyncio

import pytest

from cluster.recovery import Recovery
from cluster.recovery_event import Repair
from cluster.worker_fault import WorkerFault
from cluster.worker_repair import repairable


def fault(cause: str = "died", kind: str = "expert", rank: int | None = 2) -> WorkerFault:
    return WorkerFault(cause, rank, kind, "injected")


def test_a_named_worker_that_died_or_stalled_is_repaired_alone_where_step_loops_run():
    assert repairable(fault(), has_step_loops=True)
    assert repairable(fault(kind="attention", rank=0), has_step_loops=True)  # only its sequences prefill
    assert repairable(fault(cause="stalled"), has_step_loops=True)  # killed first: its peers' collectives end
    assert not repairable(fault(), has_step_loops=False)  # nothing tells that the survivors are idle
    assert not repairable(fault(cause="collective_error"), has_step_loops=True)  # whose fault is unknown
    assert not repairable(fault(cause="stalled", kind="unknown", rank=None), has_step_loops=True)


def test_a_repair_names_its_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        Repair("node", ())


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

    def requeue_running(ranks) -> int:
        requeues.append(ranks)
        return 7

    asyncio.run(recovery.recover(fault(), FakeExecutor(answer), requeue_running=requeue_running,
                                 fail_all=failures.append))
    return events, requeues, failures, recovery


def test_an_expert_worker_repair_requeues_nothing():
    events, requeues, failures, recovery = recover(Repair("expert_worker", ()))
    (event,) = events
    assert (event.outcome, event.repair, event.num_requeued) == ("recovered", "expert_worker", 0)
    assert requeues == [] and failures == [] and recovery.healthy and recovery.num_recoveries == 1


def test_an_attention_worker_repair_requeues_its_own_sequences_only():
    events, requeues, failures, _ = recover(Repair("attention_worker", ("attention",), (1,)))
    (event,) = events
    assert (event.repair, event.restarted_kinds) == ("attention_worker", ("attention",))
    assert event.num_requeued == 7
    assert requeues == [(1,)] and failures == []


def test_a_group_restart_requeues_every_running_sequence():
    events, requeues, failures, _ = recover(Repair("group", ("attention", "attention", "expert"), (0, 1)))
    (event,) = events
    assert (event.outcome, event.num_requeued) == ("recovered", 7) and requeues == [(0, 1)] and failures == []


@pytest.mark.parametrize("error", [TimeoutError("late"), RuntimeError("no bundle")])
def test_a_failed_recovery_requeues_then_fails_every_request(error):
    events, requeues, failures, recovery = recover(error)
    (event,) = events
    assert (event.outcome, event.num_requeued) == ("failed", 7) and requeues == [None]
    assert failures == [recovery.unhealthy_reason] and not recovery.healthy
