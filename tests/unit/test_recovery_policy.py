"""The recovery policy and the fault's description: pure, no Ray."""

from __future__ import annotations

import pytest

from cluster.recovery_policy import RecoveryPolicy
from cluster.worker_fault import WorkerFailed, WorkerFault


def test_at_most_max_recoveries_within_the_window():
    policy = RecoveryPolicy(max_recoveries=2, window_s=60)
    assert policy.may_recover([], now=1000)
    assert policy.may_recover([990], now=1000)
    assert not policy.may_recover([950, 990], now=1000)
    assert policy.may_recover([900, 990], now=1000)  # the first one left the window
    assert policy.may_recover([940, 990], now=1000.5)  # 60.5 s ago: outside


def test_zero_recoveries_never_recovers():
    assert not RecoveryPolicy(max_recoveries=0).may_recover([], now=0)


@pytest.mark.parametrize("kwargs", [{"max_recoveries": -1}, {"window_s": 0}, {"timeout_s": -1}])
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        RecoveryPolicy(**kwargs)


def test_a_fault_names_the_worker_and_the_cause():
    fault = WorkerFault("died", 2, "expert", "ActorDiedError: gone", actor_id="ab12", node_id="cd34")
    assert fault.describe() == "expert worker rank 2 actor=ab12 node=cd34 died: ActorDiedError: gone"
    assert str(WorkerFailed(fault)) == fault.describe() and WorkerFailed(fault).fault is fault
    stalled = WorkerFault("stalled", None, "unknown", "the step did not finish within 5s")
    assert stalled.describe() == "an unidentified worker stalled: the step did not finish within 5s"
    with pytest.raises(ValueError):
        WorkerFault("exploded", 0, "attention", "")
