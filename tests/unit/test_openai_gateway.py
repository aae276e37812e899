"""The HTTP gateway's pure parts, without Ray: request parsing, errors, stream merging, SSE, options."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from pydantic import ValidationError

from cluster.request_output import RequestOutput
from gateway import errors
from gateway.body_limit import BodyLimitMiddleware
from gateway.merge_streams import merge_streams
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.refusal import Kind, Refusal
from gateway.response_view import ChatView, CompletionView, sse_events
from workers.model.sampling_params import MAX_SEED, SamplingParams, SamplingParamsError


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


# -- protocol -----------------------------------------------------------------------------------


# OpenAI's bounds (n, temperature ≤ 2, logprobs ≤ 5, ...) are the front door's, for gRPC too:
# tests/unit/test_front_door.py.
@pytest.mark.parametrize("fields", [
    {"temperature": "1"}, {"max_tokens": 1.0}, {"n": True}, {"stream": 1}, {"seed": "7"},
    {"prompt": [1, "a"]}, {"prompt": None}, {"stop": [1]}, {"stop_token_ids": ["1"]},
])
def test_types_are_strict(fields):
    with pytest.raises(ValidationError):
        completion(**fields)


def sampling_params(req, **kwargs) -> SamplingParams:
    return SamplingParams(**req.sampling_values(**kwargs))


def test_unknown_fields_are_ignored_and_nulls_are_defaults():
    req = completion(frobnicate=True, temperature=None, top_p=None, max_tokens=None, stop=None)
    params = sampling_params(req, max_tokens=16, logprobs=False)
    assert (params.temperature, params.top_p, params.top_k, params.stop) == (1.0, 1.0, -1, ())
    assert completion(temperature=1).temperature == 1.0  # an integer is a fine number


@pytest.mark.parametrize(("prompt", "prompts"), [
    ("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([5, 6], [[5, 6]]), ([[5], [6, 7]], [[5], [6, 7]]), ([], []),
])
def test_prompt_shapes(prompt, prompts):
    assert completion(prompt=prompt).prompts() == prompts


def test_sampling_values_are_checked_by_sampling_params():
    with pytest.raises(SamplingParamsError) as err:
        sampling_params(completion(top_p=0), max_tokens=4, logprobs=False)
    assert err.value.field == "top_p"


def test_each_choice_gets_its_own_seed():
    req = completion(seed=MAX_SEED, n=3)
    seeds = [sampling_params(req, max_tokens=4, logprobs=False, choice=c).seed for c in range(3)]
    assert seeds[0] == MAX_SEED and len(set(seeds)) == 3


@pytest.mark.parametrize(("fields", "param"), [
    ({"presence_penalty": 0.1}, "presence_penalty"), ({"logprobs": 1}, "logprobs"), ({"echo": True}, "echo"),
    ({"best_of": 2}, "best_of"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_unimplemented_fields_are_named(fields, param):
    assert completion(**fields).unsupported_field() == param
    assert completion(presence_penalty=0, logprobs=0, best_of=1).unsupported_field() is None


def test_chat_request():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "max_completion_tokens": 5, "max_tokens": 9,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "x"}],
    })
    assert req.requested_max_tokens == 5
    assert req.message_dicts() == [{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "x"}]
    with pytest.raises(ValidationError):  # an empty list is the front door's to refuse (a limit)
        ChatCompletionRequest.model_validate({"model": "m", "messages": "hi"})
    assert ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    ).unsupported_field() == "top_logprobs"


def test_validation_errors_name_the_top_level_field():
    with pytest.raises(ValidationError) as err:
        completion(temperature="hot")
    error = errors.validation_error([{**e, "loc": ("body", *e["loc"])} for e in err.value.errors()])
    assert error.status_code == 400 and error.param == "temperature"
    assert error.body()["error"]["message"].startswith("temperature: ")


# -- streams ------------------------------------------------------------------------------------


def out(text: str, finished: bool = False, n: int = 1) -> RequestOutput:
    return RequestOutput(request_id="r", token_ids=(7,), text=text, logprobs=(None,), num_prompt_tokens=3,
                         num_output_tokens=n, finished=finished, finish_reason="length" if finished else None)


async def produce(items, delay: float, closed: list | None = None, fail: Exception | None = None):
    try:
        for item in items:
            await asyncio.sleep(delay)
            yield item
        if fail is not None:
            raise fail
    finally:
        if closed is not None:
            closed.append(True)


def test_merge_interleaves_in_order_per_stream():
    async def main():
        merged = merge_streams([produce("abc", 0.003), produce("xy", 0.002)])
        return [item async for item in merged]
    got = asyncio.run(main())
    assert sorted(got) == [(0, "a"), (0, "b"), (0, "c"), (1, "x"), (1, "y")]
    assert [x for i, x in got if i == 0] == ["a", "b", "c"]


def test_merge_raises_the_first_error_and_cancels_the_rest():
    closed: list = []

    async def main():
        failing = produce("ab", 0.001, fail=ValueError("boom"))
        merged = merge_streams([failing, produce("x" * 1000, 0.01, closed)])
        with pytest.raises(ValueError, match="boom"):
            async for _ in merged:
                pass
    asyncio.run(main())
    assert closed == [True]


def test_sse_ends_with_usage_then_done_and_errors_become_events(demo_tokenizer_dir):
    from cluster.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(demo_tokenizer_dir)

    async def collect(view, stream, include_usage):
        return [e async for e in sse_events(view, stream, include_usage=include_usage)]

    view = CompletionView("cmpl-1", 0, "m", tok, num_choices=1, num_prompt_tokens=3, logprobs=False)
    outputs = merge_streams([produce([out("a"), out(""), out("b", True, 3)], 0)])
    events = asyncio.run(collect(view, outputs, True))
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["a", "b"]  # the empty delta is skipped
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                                                   "total_tokens": 6}

    chat = ChatView("chatcmpl-1", 0, "m", tok, num_choices=1, num_prompt_tokens=3, logprobs=False)
    failing = merge_streams([produce([out("a")], 0, fail=Refusal(Kind.UNAVAILABLE, "engine down"))])
    events = asyncio.run(collect(chat, failing, False))
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "service_unavailable"
    assert events[-1] == "data: [DONE]\n\n"


# -- body limit ---------------------------------------------------------------------------------


async def echo_length(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def test_body_limit():
    async def main():
        app = BodyLimitMiddleware(echo_length, max_bytes=10)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            ok = await client.post("/", content=b"x" * 10)
            declared = await client.post("/", content=b"x" * 11)

            async def chunks():
                for _ in range(3):
                    yield b"xxxx"
            streamed = await client.post("/", content=chunks())
            return ok, declared, streamed
    ok, declared, streamed = asyncio.run(main())
    assert (ok.status_code, ok.text) == (200, "10")
    for resp in (declared, streamed):
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"


# -- options ------------------------------------------------------------------------------------


def test_serve_options_and_cli(demo_tokenizer_dir):
    from gateway.app import ServeOptions
    from gateway.cli import build_parser
    from gateway.serve_command import parse_expert_replicas

    assert parse_expert_replicas("0:3=2, 1:5=3") == {(0, 3): 2, (1, 5): 3}
    with pytest.raises(ValueError):
        parse_expert_replicas("0-3=2")
    local = ServeOptions(model_dir=str(demo_tokenizer_dir), num_expert_workers=0)
    assert local.topology() is None and local.served_model_name == demo_tokenizer_dir.name
    group = ServeOptions(model_dir=str(demo_tokenizer_dir), num_attention_workers=2, num_expert_workers=3)
    assert group.topology().world_size == 5 and group.engine_options().engine.num_attention_workers == 2
    assert "secret" not in repr(ServeOptions(model_dir=".", api_key="secret"))
    with pytest.raises(ValueError):
        ServeOptions(model_dir=".", num_expert_workers=0, num_attention_workers=2)
    args = build_parser().parse_args(["serve", "--expert-workers", "0", "--port", "8123", "--api-key", "k"])
    assert (args.expert_workers, args.port, args.api_key, args.host) == (0, 8123, "k", "127.0.0.1")
