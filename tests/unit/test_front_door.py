"""One front door for HTTP and gRPC (gateway/front_door.py), without Ray: the same invalid field sent
through the ingress's HTTP app and through its gRPC methods is refused with the same message, for
every limit both protocols have; an engine failure gets the same message over both, with each
protocol's status for its kind.

One ingress replica (gateway_fakes.make_ingress) serves both: HTTP over httpx's ASGI transport,
gRPC by calling `Generate` with a fake Serve context, as Serve's proxy does.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from ray.exceptions import RayActorError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from cluster.request_output import RequestOutput
from cluster.tokenizer import Tokenizer
from gateway.admission import EngineDraining, EngineOverloaded
from gateway.deadline import DeadlineExceeded
from gateway.errors import HTTP_STATUS
from gateway.grpc_status import GRPC_STATUS
from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.refusal import Kind
from gateway.request_limits import (
    MAX_CHOICES,
    MAX_INT32,
    MAX_MESSAGES,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    max_prompt_chars,
)
from tests.unit.gateway_fakes import FakeContext, FakeEngine, make_ingress

MODEL = "demo"
KEY = "sk-front-door"
MAX_MODEL_LEN = 64
MAX_BODY_BYTES = 4096
INVALID = (400, grpc.StatusCode.INVALID_ARGUMENT)
AUTH = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(demo_tokenizer_dir)


@pytest.fixture(scope="module")
def prompt_chars(tokenizer) -> int:
    """The most characters a text prompt may have here (1,024 for the demo tokenizer)."""
    limit = max_prompt_chars(MAX_MODEL_LEN, tokenizer.backend.get_vocab(with_added_tokens=True))
    assert limit + 200 < MAX_BODY_BYTES  # a prompt over it still fits in a request
    return limit


def ingress_for(tokenizer, engine: FakeEngine):
    return make_ingress(tokenizer, engine, max_model_len=MAX_MODEL_LEN, model_name=MODEL, api_key=KEY,
                        max_body_bytes=MAX_BODY_BYTES)


async def over_http(ingress, body: dict, headers: dict) -> httpx.Response:
    app = ingress.__serve_build_asgi_app__()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress") as http:
        return await http.post("/v1/completions", json=body, headers=headers)


async def over_grpc(ingress, request: pb.GenerateRequest, metadata) -> FakeContext:
    ctx = FakeContext(metadata)
    assert await ingress.Generate(request, ctx) == pb.GenerateResponse()  # a refused call's empty answer
    return ctx


@dataclass(frozen=True)
class Limit:
    """One invalid field as each protocol spells it, on top of a valid request."""

    http: dict  # fields over {"model", "prompt": "Hello", "max_tokens": 2}
    grpc_sampling: dict = field(default_factory=dict)  # fields over SamplingParams(max_tokens=2)
    grpc_request: dict = field(default_factory=dict)  # fields over GenerateRequest(text="Hello")
    says: str = ""  # a part of the message both must give
    expected: tuple[int, grpc.StatusCode] = INVALID
    http_headers: dict = field(default_factory=dict)  # over the API key
    grpc_metadata: tuple = ()  # over the API key
    keyless: bool = False  # send no API key


# Every limit of the front door that both protocols can express. Seeds cannot be out of range
# in gRPC (int64), n, messages and OpenAI's logprobs fields are HTTP's only: see below.
LIMITS = {
    "temperature-above-2": Limit({"temperature": 9}, {"temperature": 9},
                                 says="temperature must be in [0, 2], got 9.0"),
    "temperature-negative": Limit({"temperature": -0.5}, {"temperature": -0.5}, says="temperature"),
    "top-p-zero": Limit({"top_p": 0}, {"top_p": 0}, says="top_p must be in (0, 1]"),
    "top-p-above-1": Limit({"top_p": 1.5}, {"top_p": 1.5}, says="top_p"),
    "min-p-above-1": Limit({"min_p": 2}, {"min_p": 2}, says="min_p must be in [0, 1]"),
    "top-k-below-off": Limit({"top_k": -2}, {"top_k": -2}, says="top_k must be in [-1, 2147483647]"),
    "max-tokens-zero": Limit({"max_tokens": 0}, {"max_tokens": 0}, says="max_tokens must be in [1, "),
    "max-tokens-over-int32": Limit({"max_tokens": MAX_INT32 + 1}, {"max_tokens": MAX_INT32 + 1},
                                   says="max_tokens must be in [1, 2147483647]"),
    "stop-count": Limit({"stop": [f"s{i}" for i in range(MAX_STOP + 1)]},
                        {"stop": [f"s{i}" for i in range(MAX_STOP + 1)]},
                        says="stop must have at most 16 strings, got 17"),
    "stop-chars": Limit({"stop": ["x" * (MAX_STOP_CHARS + 1)]}, {"stop": ["x" * (MAX_STOP_CHARS + 1)]},
                        says="each stop string must have 1 to 256 characters"),
    "stop-empty": Limit({"stop": [""]}, {"stop": [""]}, says="each stop string must have 1 to 256"),
    "stop-token-ids-count": Limit({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))},
                                  {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))},
                                  says="stop_token_ids must have at most 64 ids"),
    "stop-token-id-negative": Limit({"stop_token_ids": [-1]}, {"stop_token_ids": [-1]},
                                    says="stop_token_ids must be in [0, 2147483647]"),
    "token-id-outside-vocabulary": Limit({"prompt": [1, 2048]}, grpc_request={"token_ids": [1, 2048]},
                                         says="token id 2048 is outside the vocabulary [0, 2048)"),
    "token-id-negative": Limit({"prompt": [-1]}, grpc_request={"token_ids": [-1]}, says="token id -1"),
    "empty-token-ids": Limit({"prompt": []}, grpc_request={"token_ids": []}, says="prompt must not be empty"),
    "context": Limit({"prompt": [5] * 60, "max_tokens": 10}, {"max_tokens": 10},
                     grpc_request={"token_ids": [5] * 60}, expected=(400, grpc.StatusCode.INVALID_ARGUMENT),
                     says="maximum context length is 64 tokens. However, you requested 70 tokens"),
    "unknown-model": Limit({"model": "gpt-4"}, grpc_request={"model": "gpt-4"},
                           expected=(404, grpc.StatusCode.NOT_FOUND),
                           says="The model `gpt-4` does not exist. This server serves `demo`."),
    "request-timeout-header": Limit({}, http_headers={"X-Request-Timeout": "soon"},
                                    grpc_metadata=(("x-request-timeout", "soon"),),
                                    says="X-Request-Timeout must be a number of seconds"),
    "api-key": Limit({}, keyless=True, expected=(401, grpc.StatusCode.UNAUTHENTICATED), says="API key"),
}
# Limits whose size depends on the tokenizer: filled in by `limit_case`.
SIZED = {"prompt-chars": "characters", "request-bytes": "larger than the limit of 4096 bytes"}


def limit_case(name: str, prompt_chars: int) -> Limit:
    if name == "prompt-chars":  # text that cannot fit, refused before it is tokenized
        text = "z" * (prompt_chars + 1)
        return Limit({"prompt": text}, grpc_request={"text": text}, says=f"the prompt has {prompt_chars + 1} "
                                                                         "characters")
    if name == "request-bytes":  # HTTP: 413 as the body arrives; gRPC: the message's size
        text = "z" * MAX_BODY_BYTES
        return Limit({"prompt": text}, grpc_request={"text": text}, expected=(413, INVALID[1]),
                     says="The request is larger than the limit of 4096 bytes.")
    return LIMITS[name]


def grpc_request(limit: Limit) -> pb.GenerateRequest:
    fields = {"text": "Hello", **limit.grpc_request}
    if "token_ids" in fields:
        fields.pop("text")
        fields["token_ids"] = pb.TokenIds(ids=fields["token_ids"])
    sampling = pb.SamplingParams(**{"max_tokens": 2, **limit.grpc_sampling})
    return pb.GenerateRequest(**fields, sampling=sampling)


@pytest.mark.parametrize("name", [*LIMITS, *SIZED])
def test_http_and_grpc_refuse_the_same_field_with_the_same_message(tokenizer, prompt_chars, name):
    limit = limit_case(name, prompt_chars)
    engine = FakeEngine()
    ingress = ingress_for(tokenizer, engine)
    http_headers = limit.http_headers | ({} if limit.keyless else {"authorization": f"Bearer {KEY}"})
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **limit.http}
    resp = asyncio.run(over_http(ingress, body, http_headers))
    metadata = limit.grpc_metadata + (() if limit.keyless else AUTH)
    ctx = asyncio.run(over_grpc(ingress, grpc_request(limit), metadata))
    error = resp.json()["error"]
    assert (resp.status_code, ctx.code()) == limit.expected, (error, ctx.details())
    assert error["message"] == ctx.details(), "HTTP and gRPC say different things"
    assert limit.says in error["message"], error["message"]
    assert engine.requests == []  # refused before the engine


# What only an OpenAI body can ask for (gRPC has no such fields): checked by the same front door.
HTTP_ONLY = {
    "n-zero": ({"n": 0}, "n", "n must be in [1, 8], got 0"),
    "n-above-max": ({"n": MAX_N + 1}, "n", "n must be in [1, 8], got 9"),
    "prompts-times-n": ({"prompt": ["p"] * (MAX_CHOICES // 2 + 1), "n": 2}, "n",
                        "prompts × n must be in [1, 64], got 66"),
    "prompt-empty-list": ({"prompt": [[1], []]}, "prompt", "prompt must not be empty"),
    "stop-empty-string": ({"stop": ""}, "stop", "each stop string must have 1 to 256 characters, got 0"),
    "seed-out-of-range": ({"seed": 2**64}, "seed", "seed must be null or an integer in"),
    "logprobs": ({"logprobs": 6}, "logprobs", "logprobs must be in [0, 5], got 6"),
    "temperature-just-above-2": ({"temperature": 2.01}, "temperature", "temperature must be in [0, 2]"),
    "unsupported": ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty is not supported"),
}


@pytest.mark.parametrize("name", HTTP_ONLY)
def test_http_only_limits_are_the_front_doors_too(tokenizer, name):
    fields, param, says = HTTP_ONLY[name]
    engine = FakeEngine()
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}
    resp = asyncio.run(over_http(ingress_for(tokenizer, engine), body, {"authorization": f"Bearer {KEY}"}))
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["param"] == param, error
    assert says in error["message"] and engine.requests == []


ONE_MESSAGE = [{"role": "user", "content": "a"}]


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"messages": []}, "messages", "messages must have 1 to 512 messages, got 0"),
    ({"messages": ONE_MESSAGE * (MAX_MESSAGES + 1)}, "messages", "got 513"),
    ({"messages": ONE_MESSAGE, "top_logprobs": 21}, "top_logprobs",
     "top_logprobs must be in [0, 20], got 21"),
    ({"messages": ONE_MESSAGE, "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens must be in [1, 2147483647], got 0"),
    ({"messages": ONE_MESSAGE, "max_completion_tokens": 4, "max_tokens": 0}, "max_tokens",
     "max_tokens must be in [1, 2147483647], got 0"),
])
def test_chat_limits_are_the_front_doors(tokenizer, fields, param, says):
    engine = FakeEngine()
    ingress = make_ingress(tokenizer, engine, max_model_len=MAX_MODEL_LEN, model_name=MODEL)  # 1 MiB bodies
    app = ingress.__serve_build_asgi_app__()

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://i") as http:
            return await http.post("/v1/chat/completions", json={"model": MODEL, **fields})

    resp = asyncio.run(post())
    error = resp.json()["error"]
    assert (resp.status_code, error["param"]) == (400, param) and says in error["message"], error
    assert engine.requests == []


# -- engine failures: one classification, each protocol's status ---------------------------------


def output(finished: bool, finish_reason: str | None = None, error: str | None = None) -> RequestOutput:
    return RequestOutput(request_id="r", token_ids=(5,), text="a", logprobs=(None,), num_prompt_tokens=4,
                         num_output_tokens=1, finished=finished, finish_reason=finish_reason, error=error)


FAILURES = {
    "engine-overloaded": (FakeEngine(error=EngineOverloaded("the queue is full")), 429,
                          grpc.StatusCode.RESOURCE_EXHAUSTED, "Too many requests: the queue is full."),
    # HTTP answered 503 before; overload is 429 over HTTP whichever queue is full, as gRPC had it.
    "serve-back-pressure": (FakeEngine(error=BackPressureError(num_queued_requests=9, max_queued_requests=9)),
                            429, grpc.StatusCode.RESOURCE_EXHAUSTED, "The server is overloaded"),
    "draining": (FakeEngine(error=EngineDraining("shutting down")), 503, grpc.StatusCode.UNAVAILABLE,
                 "Unavailable: shutting down."),
    "deadline": (FakeEngine(error=DeadlineExceeded("past its 2 s deadline")), 408,
                 grpc.StatusCode.DEADLINE_EXCEEDED, "Request timed out: past its 2 s deadline."),
    # HTTP answered 500 before.
    "other-timeout": (FakeEngine(error=TimeoutError("slow")), 408, grpc.StatusCode.DEADLINE_EXCEEDED,
                      "Request timed out: slow."),
    "never-fits": (FakeEngine(error=ValueError("the prompt can never fit in the KV cache")), 400,
                   grpc.StatusCode.INVALID_ARGUMENT, "the prompt can never fit in the KV cache"),
    "no-replica": (FakeEngine(error=DeploymentUnavailableError(DeploymentID("EngineDeployment", "app"))), 503,
                   grpc.StatusCode.UNAVAILABLE, "The engine is not available: DeploymentUnavailableError."),
    "replica-died": (FakeEngine(error=RayActorError()), 503, grpc.StatusCode.UNAVAILABLE,
                     "The engine is not available"),
    "worker-fault": (FakeEngine([output(True, "error", "engine unavailable: expert worker 2 died")]), 503,
                     grpc.StatusCode.UNAVAILABLE, "The engine failed the request: engine unavailable"),
    # HTTP answered 200 with no finish_reason before.
    "ended-unfinished": (FakeEngine([output(False)]), 503, grpc.StatusCode.UNAVAILABLE,
                         "the engine ended the request without finishing it"),
    # gRPC's details named the exception's message before: a bug's text is not the client's.
    "bug": (FakeEngine(error=RuntimeError("secret internals")), 500, grpc.StatusCode.INTERNAL,
            "Internal server error (RuntimeError)."),
}


@pytest.mark.parametrize("name", FAILURES)
def test_an_engine_failure_is_one_kind_rendered_by_each_protocol(tokenizer, name):
    engine, status, code, says = FAILURES[name]
    ingress = ingress_for(tokenizer, engine)
    resp = asyncio.run(over_http(ingress, {"model": MODEL, "prompt": "Hello", "max_tokens": 2},
                                 {"authorization": f"Bearer {KEY}"}))
    ctx = asyncio.run(over_grpc(ingress, pb.GenerateRequest(text="Hello"), AUTH))
    error = resp.json()["error"]
    assert (resp.status_code, ctx.code()) == (status, code), (error, ctx.details())
    assert error["message"] == ctx.details() and says in error["message"], (error, ctx.details())
    assert "secret" not in error["message"]
    if status in (429, 503):
        assert resp.headers["Retry-After"] == "1"


def test_an_abort_the_handle_refuses_does_not_hide_the_refusal(tokenizer):
    """Serve's handle refuses a full queue's abort call as it refused the request: the client is
    still told it was overloaded (not Serve's own plain-text 503, nor a 500)."""
    full = BackPressureError(num_queued_requests=4, max_queued_requests=4)
    engine = FakeEngine(error=full)

    def refuse(request_id):
        raise full

    engine.abort.remote = refuse
    ingress = ingress_for(tokenizer, engine)
    body, headers = {"model": MODEL, "prompt": "Hello"}, {"authorization": f"Bearer {KEY}"}
    resp = asyncio.run(over_http(ingress, body, headers))
    ctx = asyncio.run(over_grpc(ingress, pb.GenerateRequest(text="Hello"), AUTH))
    assert (resp.status_code, ctx.code()) == (429, grpc.StatusCode.RESOURCE_EXHAUSTED), resp.text
    assert resp.json()["error"]["code"] == "rate_limit_exceeded" and len(engine.requests) == 2


def test_every_kind_has_an_http_and_a_grpc_rendering():
    assert HTTP_STATUS.keys() == GRPC_STATUS.keys() == set(Kind)


def test_the_openapi_document_declares_the_front_doors_bounds(tokenizer):
    schema = ingress_for(tokenizer, FakeEngine()).__serve_build_asgi_app__().openapi()
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert (fields["temperature"]["minimum"], fields["temperature"]["maximum"]) == (0, 2)
    assert (fields["n"]["minimum"], fields["n"]["maximum"]) == (1, MAX_N)
    assert fields["stop"]["maxItems"] == MAX_STOP
    assert fields["max_tokens"]["maximum"] == MAX_INT32
