"""The pure decisions behind overload, deadlines and drain (gateway/admission.py,
gateway/deadline.py, gateway/drain.py): no Ray, milliseconds."""

from __future__ import annotations

import math
import pickle

import pytest

from gateway.admission import AdmissionState, EngineDraining, EngineOverloaded, refusal
from gateway.deadline import DeadlineExceeded, effective_timeout, parse_timeout, remaining_s
from gateway.drain import drained


def test_admission_refuses_at_the_bound_and_while_draining():
    assert refusal(AdmissionState(num_unscheduled=3, draining=False), max_queued_requests=4) is None
    assert isinstance(refusal(AdmissionState(4, False), 4), EngineOverloaded)
    assert isinstance(refusal(AdmissionState(0, True), 4), EngineDraining)  # draining wins, even idle
    assert isinstance(refusal(AdmissionState(9, True), 4), EngineDraining)


def test_the_errors_cross_process_boundaries_as_themselves():
    # Ray pickles a replica's exception to re-raise it at the caller, where the ingress maps it by type.
    for exc in (EngineOverloaded("full"), EngineDraining("bye"), DeadlineExceeded("late")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert issubclass(DeadlineExceeded, TimeoutError)


@pytest.mark.parametrize(("text", "seconds"), [("2.5", 2.5), ("30", 30.0), (" 1 ", 1.0), ("1e-3", 0.001)])
def test_timeout_header_values(text, seconds):
    assert parse_timeout(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "0", "-1", "nan", "inf", "-inf", "1s"])
def test_bad_timeout_header_values_are_refused(text):
    with pytest.raises(ValueError, match="X-Request-Timeout"):
        parse_timeout(text)


def test_the_shorter_budget_wins_and_a_client_cannot_extend_the_servers():
    assert effective_timeout(None, None) is None
    assert effective_timeout(30.0, None) == 30.0
    assert effective_timeout(None, 5.0) == 5.0
    assert effective_timeout(30.0, 5.0) == 5.0
    assert effective_timeout(30.0, 300.0) == 30.0


def test_remaining_time_counts_from_arrival_and_never_goes_negative():
    assert remaining_s(None, arrival_time=100.0, now=200.0) is None
    assert math.isclose(remaining_s(10.0, arrival_time=100.0, now=104.0), 6.0)
    assert remaining_s(10.0, arrival_time=100.0, now=150.0) == 0.0


def test_drained_when_every_reporting_replica_is_idle():
    assert drained({})  # nobody saw the signal: nobody admitted anything since
    assert drained({"a": 0, "b": 0})
    assert not drained({"a": 0, "b": 2})


@pytest.mark.parametrize(("exc", "code"), [
    (EngineOverloaded("full"), "RESOURCE_EXHAUSTED"),
    (EngineDraining("bye"), "UNAVAILABLE"),
    (DeadlineExceeded("late"), "DEADLINE_EXCEEDED"),
])
def test_grpc_status_of_each_refusal(exc, code):
    import grpc
    from ray.exceptions import RayTaskError

    from gateway.engine_failures import classify
    from gateway.grpc_status import grpc_error

    status = getattr(grpc.StatusCode, code)
    assert grpc_error(classify(exc)).code == status
    # As the ingress sees it: raised in the engine replica, re-raised by Ray.
    wrapped = RayTaskError("generate", "Traceback ...", exc).as_instanceof_cause()
    assert isinstance(wrapped, type(exc)) and grpc_error(classify(wrapped)).code == status
