"""The pure parts of input hardening, without a server: limits, clipping, the auth middleware,
the OpenAPI rewrite and tolerant protobuf parsing (the live-server tests are in tests/e2e/)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from gateway import errors
from gateway.auth import BearerAuthMiddleware, route_path
from gateway.grpc_parsing import MalformedMessage, tolerant
from gateway.openapi_doc import error_responses
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.request_limits import MAX_STOP_CHARS, max_prompt_chars


def test_max_prompt_chars_is_the_context_times_the_longest_token():
    assert max_prompt_chars(4096, ["a", "abc", "<|im_start|>"]) == 4096 * 12
    assert max_prompt_chars(10, []) == 10


def test_the_bound_never_refuses_a_prompt_that_fits(demo_tokenizer_dir):
    from workers.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(demo_tokenizer_dir)
    limit = max_prompt_chars(1, tok.backend.get_vocab(with_added_tokens=True))
    for text in ["The", " the", "      ", "ünïcödé", "<s>", "1234567890" * 3]:
        ids = tok.encode(text, add_bos=False)
        assert len(text) <= limit * len(ids), text  # chars per token never exceed the bound


def test_clip_bounds_echoes_and_messages():
    assert errors.clip("short") == "short"
    assert len(errors.clip("x" * 1000)) == errors.MAX_ECHO_CHARS
    echo = errors.MAX_ECHO_CHARS
    assert errors.clip_value("stop must be ..., got 'QQQQ" + "Q" * 500 + "'").count("Q") < echo
    assert errors.clip_value("roles must alternate; got 'R" + "R" * 500).count("R") < echo + 5
    assert len(errors.bad_request("m" * 10_000).message) == errors.MAX_MESSAGE_CHARS
    assert "M" * errors.MAX_ECHO_CHARS not in errors.model_not_found("M" * 5000).message


def test_validation_messages_name_fields_not_union_members():
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "stop": ["x" * (MAX_STOP_CHARS + 1)]})
    message = errors.validation_error(err.value.errors()).message
    assert "function-after" not in message and "stop" in message and "256" in message
    with pytest.raises(ValidationError) as err:
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "logit_bias": {"K" * 5000: "x"}})
    assert "K" * errors.MAX_ECHO_CHARS not in errors.validation_error(err.value.errors()).message
    json_error = errors.validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "bad"}])
    assert json_error.code == "invalid_json" and json_error.param is None


@pytest.mark.parametrize("fields", [
    {"temperature": float("nan")}, {"top_p": float("inf")}, {"max_tokens": 2**31}, {"seed": 2**64},
    {"top_k": -2}, {"stop": [""]}, {"stop": ["s"] * 17}, {"stop_token_ids": list(range(65))},
    {"prompt": "\ud800"}, {"model": "\udfff"}, {"prompt": [2**31]}, {"user": "a\ud800"},
], ids=repr)
def test_the_schema_refuses_what_the_engine_should_never_see(fields):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})


def test_chat_counts_content_characters_and_bounds_messages():
    parts = [{"type": "text", "text": "de"}]
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "abc"}, {"role": "assistant", "content": parts}]})
    assert body.num_content_chars() == 5
    with pytest.raises(ValidationError):
        one = {"role": "user", "content": "a"}
        ChatCompletionRequest.model_validate({"model": "m", "messages": [one] * 513})


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

    monkeypatch.setattr(grpc_methods, "HEALTH_WATCH_INTERVAL_S", 0.01)

    class Ingress(grpc_methods.GrpcMethods):
        async def _serving_status(self):
            return health_pb2.HealthCheckResponse.SERVING

    async def main():
        ingress, request = Ingress(), health_pb2.HealthCheckRequest()
        watches = [ingress.Watch(request, FakeContext()) for _ in range(grpc_methods.MAX_HEALTH_WATCHES)]
        for watch in watches:
            assert (await anext(watch)).status == health_pb2.HealthCheckResponse.SERVING
        context = FakeContext()
        with pytest.raises(grpc_methods.GrpcError):
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
