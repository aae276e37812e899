"""The engine's side of recovery, without Ray: a single-process executor that fails chosen steps
as a worker fault would. Pins down requeue, re-run and giving up quickly; the Ray tests
(test_fault_recovery.py) inject real faults."""

from __future__ import annotations

import pytest

from cluster.local_engine import build_local_engine
from cluster.recovery import Recovery
from cluster.recovery_event import Repair
from cluster.recovery_policy import RecoveryPolicy
from cluster.worker_fault import WorkerFailed, WorkerFault
from tests.fault_run import ENGINE_CFG, prompts, run, run_requests


@pytest.fixture(scope="module")
def reference(demo_model_dir) -> list[list[int]]:
    """The fault-free greedy tokens of every request."""
    engine = build_local_engine(demo_model_dir, ENGINE_CFG)
    return run(engine, run_requests(engine, prompts()))["tokens"]


class FlakyExecutor:
    """The single-process executor, failing the given steps as a worker fault would."""

    num_attention_workers = 1

    def __init__(self, inner, fail_steps: set[int]) -> None:
        self.inner, self.fail_steps = inner, fail_steps
        self.num_steps = self.num_recoveries = 0

    async def execute(self, batches):
        self.num_steps += 1
        if self.num_steps in self.fail_steps:
            raise WorkerFailed(WorkerFault("died", 1, "expert", "injected", actor_id="a1", node_id="n1"))
        return await self.inner.execute(batches)

    async def recover(self, fault, timeout_s):
        self.num_recoveries += 1
        return Repair("group", ("attention", "expert"), (0,))


def test_engine_requeues_and_reruns_after_a_fault(demo_model_dir, reference):
    engine = build_local_engine(demo_model_dir, ENGINE_CFG)
    engine.executor = flaky = FlakyExecutor(engine.executor, fail_steps={3, 9})
    got = run(engine, run_requests(engine, prompts()))
    assert got["tokens"] == reference
    assert [(e.outcome, e.fault.rank, e.restarted_kinds) for e in got["events"]] == \
        [("recovered", 1, ("attention", "expert"))] * 2
    assert flaky.num_recoveries == 2 and engine.stats().num_recoveries == 2 and engine.healthy


def test_engine_gives_up_past_the_policy_and_refuses_new_requests(demo_model_dir):
    engine = build_local_engine(demo_model_dir, ENGINE_CFG)
    engine.recovery = Recovery(RecoveryPolicy(max_recoveries=1, window_s=600))
    engine.executor = FlakyExecutor(engine.executor, fail_steps={3, 9})
    got, late = run(engine, run_requests(engine, prompts()), run_requests(engine, prompts()[:2]))
    assert [e.outcome for e in got["events"]] == ["recovered", "refused"]
    for r in got["results"] + late["results"]:
        assert r["finish_reason"] == "error"
        assert r["error"] == engine.unhealthy_reason
    assert "engine unavailable: expert worker rank 1" in engine.unhealthy_reason
    assert not engine.healthy and not engine.stats().healthy
