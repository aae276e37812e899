"""Which worker a failed step blames (cluster/fault_diagnosis.py): pure, no Ray cluster."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError

from cluster.fault_diagnosis import PROBE_TIMEOUT_S, Roster, blame, one_line

ROSTER = Roster(kinds=("attention", "expert", "expert"), actor_ids=("a0", "a1", "a2"),
                node_ids={0: "n0", 1: "n1", 2: "n2"})
ANSWERS = [{"rank": r} for r in range(3)]  # every worker answered its probe


def test_a_dead_actor_among_the_step_errors_is_blamed_first():
    errors = {0: RuntimeError("gloo: connection reset by peer"), 2: ActorDiedError()}
    fault = blame(errors, [], ROSTER, stalled=False, step_timeout_s=60)
    assert (fault.cause, fault.rank, fault.kind) == ("died", 2, "expert")
    assert (fault.actor_id, fault.node_id) == ("a2", "n2")
    assert fault.detail.startswith("ActorDiedError: ")


def test_a_probe_finds_the_dead_peer_behind_a_collective_error():
    errors = {0: RuntimeError("gloo: connection reset by peer")}
    probes = [ANSWERS[0], ActorDiedError(), ANSWERS[2]]
    fault = blame(errors, probes, ROSTER, stalled=False, step_timeout_s=60)
    assert (fault.cause, fault.rank, fault.kind) == ("died", 1, "expert")


@pytest.mark.parametrize(("stalled", "cause"), [(True, "stalled"), (False, "collective_error")])
def test_the_worker_that_does_not_answer_is_blamed(stalled, cause):
    errors = {} if stalled else {0: RuntimeError("gloo timeout")}
    probes = [ANSWERS[0], ANSWERS[1], TimeoutError()]
    fault = blame(errors, probes, ROSTER, stalled=stalled, step_timeout_s=60)
    assert (fault.cause, fault.rank) == (cause, 2)
    assert fault.detail == f"does not answer a probe within {PROBE_TIMEOUT_S:.0f}s (TimeoutError)"


def test_a_stall_where_everyone_answers_names_nobody():
    fault = blame({}, ANSWERS, ROSTER, stalled=True, step_timeout_s=7.5)
    assert (fault.cause, fault.rank, fault.kind) == ("stalled", None, "unknown")
    assert "7.5s" in fault.detail


def test_an_error_where_everyone_answers_blames_the_rank_that_raised():
    fault = blame({1: RuntimeError("bad\n  split sizes")}, ANSWERS, ROSTER, stalled=False, step_timeout_s=60)
    assert (fault.cause, fault.rank, fault.detail) == ("collective_error", 1, "RuntimeError: bad split sizes")


def test_one_line_folds_and_cuts_a_long_error():
    text = one_line(ValueError("x\n" * 400), limit=10)
    assert text == "ValueError: x x x x x …"
