"""The pure parts of input hardening, without a server: limits, clipping, the auth middleware,
the OpenAPI rewrite and tolerant protobuf parsing (the live-server tests are in tests/e2e/; every
limit over both protocols: tests/unit/test_front_door.py)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from cluster.tokenizer import Tokenizer
from gateway import errors, refusal
from gateway.auth import BearerAuthMiddleware, route_path
from gateway.front_door import FrontDoor, ServingLimits
from gateway.grpc_parsing import MalformedMessage, tolerant
from gateway.openapi_doc import error_responses
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.refusal import Refusal
from gateway.request_limits import max_prompt_chars


def test_max_prompt_chars_is_the_context_times_the_longest_token():
    assert max_prompt_chars(4096, ["a", "abc", "<|im_start|>"]) == 4096 * 12
    assert max_prompt_chars(10, []) == 10


@pytest.fixture(scope="module")
def front_door(demo_tokenizer_dir) -> FrontDoor:
    tok = Tokenizer.from_dir(demo_tokenizer_dir)
    return FrontDoor(tok, ServingLimits(model_name="m", max_model_len=4096, vocab_size=tok.vocab_size))


def test_the_bound_never_refuses_a_prompt_that_fits(demo_tokenizer_dir):
    tok = Tokenizer.from_dir(demo_tokenizer_dir)
    limit = max_prompt_chars(1, tok.backend.get_vocab(with_added_tokens=True))
    for text in ["The", " the", "      ", "ünïcödé", "<s>", "1234567890" * 3]:
        ids = tok.encode(text, add_bos=False)
        assert len(text) <= limit * len(ids), text  # chars per token never exceed the bound


def test_clip_bounds_echoes_and_messages():
    assert refusal.clip("short") == "short"
    assert len(refusal.clip("x" * 1000)) == refusal.MAX_ECHO_CHARS
    echo = refusal.MAX_ECHO_CHARS
    assert refusal.clip_value("stop must be ..., got 'QQQQ" + "Q" * 500 + "'").count("Q") < echo
    assert refusal.clip_value("roles must alternate; got 'R" + "R" * 500).count("R") < echo + 5
    assert len(refusal.invalid(None, "m" * 10_000).message) == refusal.MAX_MESSAGE_CHARS
    assert len(errors.APIError(400, "m" * 10_000).message) == refusal.MAX_MESSAGE_CHARS
    assert "M" * refusal.MAX_ECHO_CHARS not in refusal.unknown_model("M" * 5000, "demo").message
    assert refusal.invalid("top_k", "top_k must be ..., got " + "9" * 5000).message.count("9") < echo


def test_validation_messages_name_fields_not_union_members():
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "stop": [1]})
    message = errors.validation_error(err.value.errors()).message
    assert "function-after" not in message and "stop" in message and "valid string" in message
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "logit_bias": {"K" * 5000: "x"}})
    assert "K" * refusal.MAX_ECHO_CHARS not in errors.validation_error(err.value.errors()).message
    json_error = errors.validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "bad"}])
    assert json_error.code == "invalid_json" and json_error.param is None


@pytest.mark.parametrize("fields", [
    {"temperature": float("nan")}, {"top_p": float("inf")}, {"prompt": "\ud800"}, {"model": "\udfff"},
    {"user": "a\ud800"},
], ids=repr)
def test_the_schema_refuses_what_is_no_number_or_no_text(fields):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})


# The limits moved from the schema to the front door, which checks gRPC requests too.
@pytest.mark.parametrize("fields", [
    {"max_tokens": 2**31}, {"seed": 2**64}, {"top_k": -2}, {"stop": [""]}, {"stop": ["s"] * 17},
    {"stop_token_ids": list(range(65))}, {"prompt": [2**31]},
], ids=repr)
def test_the_front_door_refuses_what_the_engine_should_never_see(front_door, fields):
    body = CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})
    with pytest.raises(Refusal) as err:
        asyncio.run(front_door.completion(body, "cmpl-test", None))
    assert err.value.field == next(iter(fields))


def test_chat_counts_content_characters_and_bounds_messages(front_door):
    parts = [{"type": "text", "text": "de"}]
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "abc"}, {"role": "assistant", "content": parts}]})
    assert body.num_content_chars() == 5
    one = {"role": "user", "content": "a"}
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [one] * 513})
    with pytest.raises(Refusal) as err:
        asyncio.run(front_door.chat(body, "chatcmpl-test", None))
    assert err.value.field == "messages" and "512" in err.value.message


def test_route_path_strips_the_serve_route_prefix():
    assert route_path({"path": "/keyed/health", "root_path": "/keyed"}) == "/health"
    assert route_path({"path": "/keyed", "root_path": "/keyed"}) == "/"
    assert route_path({"path": "/keyedx/health", "root_path": "/keyed"}) == "/keyedx/health"
    assert route_path({"path": "/health"}) == "/health"


def run_asgi(app, path: str, headers: list[tuple[bytes, bytes]]) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": headers,
             "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent


def test_auth_middleware_answers_401_before_the_app_runs():
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])

    guarded = BearerAuthMiddleware(app, api_key="k")
    sent = run_asgi(guarded, "/v1/models", [])
    assert sent[0]["status"] == 401 and calls == []
    run_asgi(guarded, "/health", [])
    run_asgi(guarded, "/v1/models", [(b"authorization", b"Bearer k")])
    assert run_asgi(guarded, "/v1/models", [(b"authorization", b"Bearer \xff")])[0]["status"] == 401
    assert calls == ["/health", "/v1/models"]
    open_app = BearerAuthMiddleware(app, api_key=None)
    run_asgi(open_app, "/anything", [])
    assert calls[-1] == "/anything"


def test_openapi_rewrite_replaces_422_with_our_errors():
    doc = {"paths": {"/v1/completions": {"post": {"responses": {"200": {"content": {"application/json": {}}},
                                                                  "422": {}}}},
                     "/health": {"get": {"responses": {"200": {}}}}},
           "components": {"schemas": {"HTTPValidationError": {}, "ValidationError": {}}}}
    out = error_responses(doc, api_key_required=True)
    post = out["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in post and {"400", "401", "413", "503"} <= post.keys()
    assert "text/event-stream" in post["200"]["content"]
    health = out["paths"]["/health"]["get"]
    assert health["security"] == [] and "401" not in health["responses"]
    schemas = out["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ErrorResponse" in schemas
    assert "422" in doc["paths"]["/v1/completions"]["post"]["responses"]  # the input is not modified


def test_tolerant_parsing_turns_bad_bytes_into_a_malformed_message():
    from gateway.grpc_stubs import moe_serve_pb2 as pb

    parse = tolerant(pb.GenerateRequest.FromString)
    assert parse(pb.GenerateRequest(text="hi").SerializeToString()).text == "hi"
    bad = parse(b"\x12\x02\xff\xfe")  # text: invalid UTF-8
    assert isinstance(bad, MalformedMessage) and bad.message_type == "moe_serve.v1.GenerateRequest"
    assert "4 bytes" in bad.reason
    assert tolerant(None) is None


class FakeContext:
    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def test_health_watches_are_bounded_in_number_and_time(monkeypatch):
    """Health needs no key, and a cancelled Watch cannot tell its client left (it yields only on a
    change): so a replica runs at most MAX_HEALTH_WATCHES of them, each for a bounded time."""
    import grpc
    from grpc_health.v1 import health_pb2

    from gateway import grpc_methods
    from gateway.grpc_status import GrpcError

    monkeypatch.setattr(grpc_methods, "HEALTH_WATCH_INTERVAL_S", 0.01)

    class Service(grpc_methods.GrpcService):
        async def _serving_status(self):
            return health_pb2.HealthCheckResponse.SERVING

    async def main():
        ingress = Service(front_door=None, engine=None, api_key=None)
        request = health_pb2.HealthCheckRequest()
        watches = [ingress.Watch(request, FakeContext()) for _ in range(grpc_methods.MAX_HEALTH_WATCHES)]
        for watch in watches:
            assert (await anext(watch)).status == health_pb2.HealthCheckResponse.SERVING
        context = FakeContext()
        with pytest.raises(GrpcError):
            await anext(ingress.Watch(request, context))
        assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        await watches.pop().aclose()  # a client that hangs up frees its slot
        monkeypatch.setattr(grpc_methods, "HEALTH_WATCH_MAX_S", 0.05)
        last = ingress.Watch(request, FakeContext())
        await anext(last)
        with pytest.raises(StopAsyncIteration):  # and a watch ends by itself
            await asyncio.wait_for(anext(last), 5)
        for watch in watches:
            await watch.aclose()
        assert ingress._num_watches == 0

    asyncio.run(main())
