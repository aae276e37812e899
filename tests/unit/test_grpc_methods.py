"""The gRPC service without Ray: a fake engine handle and a fake Serve gRPC context.

The e2e tests (tests/e2e/test_grpc.py) drive the same methods through Serve's gRPC proxy; these
pin the mapping from requests, engine outputs and engine errors to messages and status codes
(that HTTP refuses the same requests with the same messages: tests/unit/test_front_door.py).
"""

from __future__ import annotations

import asyncio
import math
import pickle

import grpc
import pytest
from grpc_health.v1 import health_pb2
from ray.serve.exceptions import BackPressureError

from cluster.request_output import RequestOutput
from cluster.tokenizer import Tokenizer
from gateway import grpc_stubs
from gateway.engine_failures import classify
from gateway.front_door import FrontDoor, ServingLimits, grpc_sampling_values
from gateway.grpc_methods import GrpcService
from gateway.grpc_status import GrpcError, grpc_error
from gateway.grpc_stubs import moe_serve_pb2 as pb
from tests.unit.gateway_fakes import FakeContext, FakeEngine
from workers.model.sampling_params import SamplingParams, SamplingParamsError

KEY = "sk-test"


def grpc_service(engine, tokenizer, api_key=KEY) -> GrpcService:
    """An ingress replica's gRPC service: model "demo" with a context of 64 tokens."""
    limits = ServingLimits(model_name="demo", max_model_len=64, vocab_size=tokenizer.vocab_size)
    return GrpcService(FrontDoor(tokenizer, limits), engine, api_key)


def outputs(token_ids, texts, finish_reason="length", num_prompt_tokens=3):
    return [
        RequestOutput(request_id="r", token_ids=(t,), text=s, logprobs=(-0.5 * (i + 1),),
                      num_prompt_tokens=num_prompt_tokens, num_output_tokens=i + 1,
                      finished=i == len(token_ids) - 1,
                      finish_reason=finish_reason if i == len(token_ids) - 1 else None)
        for i, (t, s) in enumerate(zip(token_ids, texts, strict=True))
    ]


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer_dir):
    return Tokenizer.from_dir(demo_tokenizer_dir)


def authed():
    return FakeContext([("authorization", f"Bearer {KEY}")])


def request(text="Hello", **sampling):
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(**sampling))


def run(coro):
    return asyncio.run(coro)


async def collect_stream(ingress, req, ctx):
    return [m async for m in ingress.GenerateStream(req, ctx)]


def test_generate_joins_the_stream_and_reports_usage(tokenizer):
    engine = FakeEngine(outputs([5, 6, 7], ["a", "b", "c"], finish_reason="stop"))
    ingress = grpc_service(engine, tokenizer)
    ctx = authed()
    resp = run(ingress.Generate(request("Hello", temperature=0, logprobs=True), ctx))
    assert ctx.code() is None
    assert list(resp.token_ids) == [5, 6, 7] and resp.text == "abc"
    assert list(resp.logprobs) == [-0.5, -1.0, -1.5]
    assert resp.finish_reason == pb.FINISH_REASON_STOP and resp.model == "demo"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (3, 3, 6)
    gen = engine.requests[0]
    assert gen.prompt_ids == tuple(tokenizer.encode("Hello")) and resp.request_id == gen.request_id
    assert gen.params.temperature == 0.0 and gen.params.logprobs
    assert engine.aborted == [] and engine.cancelled == 0  # finished: nothing to abort


def test_stream_sends_deltas_and_finishes_on_the_last_message(tokenizer):
    ingress = grpc_service(FakeEngine(outputs([5, 6], ["x", "y"])), tokenizer)
    msgs = run(collect_stream(ingress, request(), authed()))
    assert [(list(m.token_ids), m.text) for m in msgs] == [([5], "x"), ([6], "y")]
    assert [m.finish_reason for m in msgs] == [pb.FINISH_REASON_UNSPECIFIED, pb.FINISH_REASON_LENGTH]
    assert not msgs[0].HasField("usage") and msgs[1].usage.total_tokens == 5
    assert all(not m.logprobs for m in msgs)  # not asked for


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(**grpc_sampling_values(msg))


def test_unset_sampling_fields_take_the_defaults_and_zero_is_a_value():
    assert sampling_params(pb.SamplingParams()) == sampling_params(pb.SamplingParams(max_tokens=16))
    p = sampling_params(pb.SamplingParams(temperature=0, top_k=0, seed=0, stop=["\n"], stop_token_ids=[2]))
    assert (p.temperature, p.top_k, p.seed, p.stop, p.stop_token_ids) == (0.0, 0, 0, ("\n",), (2,))
    assert sampling_params(pb.SamplingParams()).temperature == 1.0
    with pytest.raises(SamplingParamsError):
        sampling_params(pb.SamplingParams(top_p=0))  # explicitly 0: invalid, not "unset"


# The details are the HTTP messages (one front door): out-of-vocabulary ids are "token id ...
# outside the vocabulary" and an overlong prompt "maximum context length", no longer gRPC's own
# "token_ids: ..." and "sampling.max_tokens: ...".
@pytest.mark.parametrize("req, field", [
    (request(temperature=-1), "temperature"),
    (request(temperature=9), "temperature"),  # OpenAI's range [0, 2], as over HTTP
    (request(top_p=1.5), "top_p"),
    (request(max_tokens=0), "max_tokens"),
    (request(top_k=-2), "top_k"),
    (request(stop=[""]), "stop"),
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, -1])), "outside the vocabulary"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**9])), "outside the vocabulary"),
    (request("word " * 100), "maximum context length"),  # prompt + max_tokens beyond max_model_len
])
def test_bad_requests_are_invalid_argument_and_never_reach_the_engine(tokenizer, req, field):
    engine = FakeEngine()
    ingress = grpc_service(engine, tokenizer)
    ctx = authed()
    assert run(ingress.Generate(req, ctx)) == pb.GenerateResponse()
    assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT and field in ctx.details()
    # A stream cannot return a status: it raises, with the status set on the context.
    ctx = authed()
    with pytest.raises(GrpcError):
        run(collect_stream(ingress, req, ctx))
    assert ctx.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert engine.requests == []


@pytest.mark.parametrize("metadata", [
    [], [("authorization", "Bearer wrong")], [("authorization", KEY)], [("authorization", f"Basic {KEY}")],
])
def test_a_missing_or_wrong_key_is_unauthenticated(tokenizer, metadata):
    ingress = grpc_service(FakeEngine(outputs([5], ["a"])), tokenizer)
    for call, empty in ((ingress.Generate, pb.GenerateResponse()),
                        (ingress.ListModels, pb.ListModelsResponse())):
        ctx = FakeContext(metadata)
        assert run(call(request() if call == ingress.Generate else pb.ListModelsRequest(), ctx)) == empty
        assert ctx.code() == grpc.StatusCode.UNAUTHENTICATED and KEY not in ctx.details()


def test_the_key_is_optional_when_none_is_set_and_the_scheme_is_case_insensitive(tokenizer):
    ctx = FakeContext()
    open_service = grpc_service(FakeEngine(outputs([5], ["a"])), tokenizer, api_key=None)
    resp = run(open_service.Generate(request(), ctx))
    assert ctx.code() is None and resp.text == "a"
    ctx = FakeContext([("authorization", f"bearer {KEY}")])
    resp = run(grpc_service(FakeEngine(outputs([5], ["a"])), tokenizer).Generate(request(), ctx))
    assert ctx.code() is None and resp.text == "a"


def test_list_models_and_unknown_model(tokenizer):
    ingress = grpc_service(FakeEngine(outputs([5], ["a"])), tokenizer)
    models = run(ingress.ListModels(pb.ListModelsRequest(), authed())).models
    assert [(m.id, m.max_model_len) for m in models] == [("demo", 64)]
    ctx = authed()
    run(ingress.Generate(pb.GenerateRequest(model="gpt-4", text="hi"), ctx))
    assert ctx.code() == grpc.StatusCode.NOT_FOUND and "gpt-4" in ctx.details()
    ctx = authed()
    assert run(ingress.Generate(pb.GenerateRequest(model="demo", text="hi"), ctx)).text == "a"


@pytest.mark.parametrize("exc, code", [
    (BackPressureError(num_queued_requests=10, max_queued_requests=10), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError("slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (ValueError("the prompt can never fit"), grpc.StatusCode.INVALID_ARGUMENT),
    (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
])
def test_engine_exceptions_map_to_status_codes(tokenizer, exc, code):
    assert grpc_error(classify(exc)).code == code
    ctx = authed()
    run(grpc_service(FakeEngine(error=exc), tokenizer).Generate(request(), ctx))
    assert ctx.code() == code


def test_an_engine_failure_mid_stream_is_unavailable(tokenizer):
    outs = outputs([5], ["a"])
    failed = RequestOutput(request_id="r", token_ids=(), text="", logprobs=(), num_prompt_tokens=3,
                           num_output_tokens=1, finished=True, finish_reason="error", error="worker died")
    ingress = grpc_service(FakeEngine([*outs[:1], failed]), tokenizer)
    ctx = authed()
    with pytest.raises(GrpcError):
        run(collect_stream(ingress, request(), ctx))
    assert ctx.code() == grpc.StatusCode.UNAVAILABLE and "worker died" in ctx.details()


def test_a_stream_that_ends_unfinished_is_unavailable_and_aborted(tokenizer):
    engine = FakeEngine(outputs([5, 6], ["a", "b"])[:1])
    ctx = authed()
    run(grpc_service(engine, tokenizer).Generate(request(), ctx))
    assert ctx.code() == grpc.StatusCode.UNAVAILABLE
    assert engine.aborted == [engine.requests[0].request_id]


def test_a_client_that_leaves_early_aborts_the_engine_request(tokenizer):
    engine = FakeEngine(outputs(list(range(5, 15)), ["t"] * 10))
    ingress = grpc_service(engine, tokenizer)

    async def read_one_then_hang_up():
        stream = ingress.GenerateStream(request(), authed())
        await anext(stream)
        await stream.aclose()  # what Serve does when the gRPC client cancels

    run(read_one_then_hang_up())
    assert engine.aborted == [engine.requests[0].request_id] and engine.cancelled == 1

    async def cancel_unary():
        task = asyncio.create_task(ingress.Generate(request(), authed()))
        while len(engine.requests) < 2:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_unary())
    assert engine.aborted[1] == engine.requests[1].request_id


@pytest.mark.parametrize("ready, status", [
    (True, health_pb2.HealthCheckResponse.SERVING),
    (False, health_pb2.HealthCheckResponse.NOT_SERVING),
    (RuntimeError("replica died"), health_pb2.HealthCheckResponse.NOT_SERVING),
])
def test_health_follows_engine_readiness_without_a_key(tokenizer, ready, status):
    ingress = grpc_service(FakeEngine(ready=ready), tokenizer)
    for service in ("", "moe_serve.v1.MoeServe"):
        ctx = FakeContext()
        assert run(ingress.Check(health_pb2.HealthCheckRequest(service=service), ctx)).status == status
        assert ctx.code() is None

    async def first_watch_message():
        watch = ingress.Watch(health_pb2.HealthCheckRequest())
        try:
            return await anext(watch)
        finally:
            await watch.aclose()

    assert run(first_watch_message()).status == status


def test_health_of_an_unknown_service(tokenizer):
    ingress = grpc_service(FakeEngine(), tokenizer)
    ctx = FakeContext()
    run(ingress.Check(health_pb2.HealthCheckRequest(service="nope"), ctx))
    assert ctx.code() == grpc.StatusCode.NOT_FOUND

    async def watch_unknown():
        return [m async for m in ingress.Watch(health_pb2.HealthCheckRequest(service="nope"))]

    assert [m.status for m in run(watch_unknown())] == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]


def test_logprobs_unknown_to_the_engine_are_nan(tokenizer):
    out = RequestOutput(request_id="r", token_ids=(5,), text="a", logprobs=(None,), num_prompt_tokens=1,
                        num_output_tokens=1, finished=True, finish_reason="stop")
    resp = run(grpc_service(FakeEngine([out]), tokenizer).Generate(request(logprobs=True), authed()))
    assert math.isnan(resp.logprobs[0])


def test_a_grpc_error_survives_pickling():
    # Serve pickles a stream's exception from the replica to the proxy.
    err = pickle.loads(pickle.dumps(GrpcError(grpc.StatusCode.INVALID_ARGUMENT, "top_p: bad")))
    assert (err.code, err.details, str(err)) == (grpc.StatusCode.INVALID_ARGUMENT, "top_p: bad", "top_p: bad")


def test_servicer_functions_resolve_to_adders():
    from ray._common.utils import import_attr

    adders = [import_attr(path) for path in grpc_stubs.servicer_functions()]
    assert [a.__name__ for a in adders] == ["add_MoeServeServicer_to_server", "add_HealthServicer_to_server"]
    assert not grpc_stubs.is_stale()
