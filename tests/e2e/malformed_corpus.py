"""A deterministic corpus of malformed HTTP requests, and the status each must get.

`http_cases(model, api_key, vocab_size)` builds (name, method, path, headers, body, status)
cases in the categories of issue 8: invalid and truncated JSON, wrong types, non-object bodies,
non-UTF-8 bytes, deep nesting, huge numbers, NaN and infinities, out-of-range sampling values,
unknown fields, empty messages, out-of-vocabulary token ids, request limits, oversized bodies,
methods and paths, and authentication. Every case is refused before the engine is called, so
the corpus runs in seconds; `tests/e2e/test_malformed_input.py` sends it. No randomness: the
same list every run, so a failure names a case that can be replayed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.request_limits import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_CHOICES,
    MAX_INT32,
    MAX_MESSAGES,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
JSON = (("content-type", "application/json"),)
MAX_BODY_BYTES = DEFAULT_MAX_BODY_BYTES  # the test servers run with the default


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]  # without the API key: the sender adds it unless `keyless`
    body: bytes
    status: int  # the documented status this request must get
    keyless: bool = False  # send the headers as they are (authentication cases)


def http_cases(model: str, api_key: str, vocab_size: int) -> list[Case]:
    cases = [*_invalid_json(model), *_truncated_json(model), *_wrong_types(model), *_non_objects(),
             *_non_utf8(model), *_deep_nesting(model), *_huge_numbers(model), *_nan_and_infinity(model),
             *_out_of_range(model), *_unknown_fields(), *_empty_messages(model),
             *_out_of_vocabulary(model, vocab_size), *_over_limits(model), *_oversized(model),
             *_methods_and_paths(model), *_content_types(model), *_authentication(model, api_key)]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


# -- helpers ------------------------------------------------------------------------------------


def completion(model: str, **fields) -> dict:
    return {"model": model, "prompt": "Hello", "max_tokens": 2, **fields}


def chat(model: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **fields}


def _post(name: str, path: str, body: bytes | dict, status: int = 400,
          headers: tuple[tuple[str, str], ...] = JSON) -> Case:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(name, "POST", path, headers, raw, status)


def _both(name: str, model: str, status: int = 400, **fields) -> Iterator[Case]:
    """The same fields on both generation endpoints."""
    yield _post(f"completions/{name}", COMPLETIONS, completion(model, **fields), status)
    yield _post(f"chat/{name}", CHAT, chat(model, **fields), status)


def _splice(body: dict, key: str, raw_value: str) -> bytes:
    """`body` with `key` set to `raw_value` verbatim: JSON that json.dumps cannot write (NaN, 1e999)."""
    text = json.dumps({**body, key: "__RAW__"})
    return text.replace('"__RAW__"', raw_value).encode()


# -- categories ---------------------------------------------------------------------------------

_INVALID_JSON = [
    "{", "}", "{{}", '{"model"', '{"model":}', '{"model" "demo"}', "{'model': 'demo'}", '{"model":"demo",}',
    '{"model":"demo" "prompt":"x"}', '{model: "demo"}', '{"model":"demo"]', '["model"}', '{"a":1}{"b":2}',
    '{"model":"demo"} trailing', '{"prompt":"unterminated}', '{"prompt":"bad \\x escape"}',
    '{"prompt":"short \\u12 escape"}', '{"prompt":"raw\ncontrol"}', '{"prompt":"tab\tinside"}',
    '{"max_tokens":01}', '{"max_tokens":+1}', '{"max_tokens":.5}', '{"max_tokens":1.}', '{"max_tokens":0x10}',
    '{"max_tokens":1e}', '{"max_tokens":--1}', '{"stream":tru}', '{"stream":True}', '{"user":None}',
    '{"model":undefined}', "/* comment */ {}", '{"a":1 // comment\n}', "{,}", '{"a":[1,]}', '{"a":[,1]}',
    '{"a"::1}', '{"a":1,,"b":2}', "\x00", "{\x00}", '{"a":"\\"}',
]


def _invalid_json(model: str) -> Iterator[Case]:
    for i, text in enumerate(_INVALID_JSON):
        yield _post(f"completions/invalid-json-{i}", COMPLETIONS, text.encode())
        yield _post(f"chat/invalid-json-{i}", CHAT, text.encode())


def _truncated_json(model: str) -> Iterator[Case]:
    for path, body in ((COMPLETIONS, completion(model, temperature=0.5, stop=["x", "y"])),
                       (CHAT, chat(model, temperature=0.5, n=1))):
        raw = json.dumps(body).encode()
        for cut in range(0, len(raw), max(1, len(raw) // 40)):  # about 40 prefixes, the empty one too
            yield _post(f"{path}/truncated-{cut}", path, raw[:cut])


# Wrong JSON types per field (null is "the default" for optional fields, so it is left out there).
_STRINGS = [1, 1.5, True, [], {}, ["a"]]
_INTS = ["1", 1.5, True, [], {}, "one"]
_FLOATS = ["1", True, [], {}, "0.5"]
_BOOLS = [1, 0, "true", [], {}, "yes"]
_COMMON = {
    "model": [None, *_STRINGS], "max_tokens": _INTS, "temperature": _FLOATS, "top_p": _FLOATS,
    "top_k": _INTS, "min_p": _FLOATS, "seed": _INTS, "n": [None, *_INTS], "stream": [None, *_BOOLS],
    "ignore_eos": [None, *_BOOLS], "stop": [1, True, {}, [1], [None], [["x"]]],
    "stop_token_ids": [1, "1", [1.5], ["1"], [True], {}],
    "stream_options": [1, "x", [], {"include_usage": 1}],
    "presence_penalty": _FLOATS, "frequency_penalty": _FLOATS, "logit_bias": [1, "x", [], {"1": "x"}],
    "user": _STRINGS,
}
_COMPLETION_ONLY = {
    "prompt": [None, 1, 1.5, True, {}, [1.5], [True], [[1.5]], [[1], "a"], [{"a": 1}]],
    "logprobs": ["1", 1.5, True, []], "echo": [1, "true"], "suffix": [1, []], "best_of": ["1", 1.5, True],
}
_CHAT_ONLY = {
    "messages": [None, "hi", {}, 1, [1], ["hi"], [None]], "max_completion_tokens": _INTS,
    "logprobs": [1, "true", []], "top_logprobs": ["1", 1.5, True], "tools": [1, "x", {}],
}


def _wrong_types(model: str) -> Iterator[Case]:
    for fields, path, make in ((_COMMON | _COMPLETION_ONLY, COMPLETIONS, completion),
                               (_COMMON | _CHAT_ONLY, CHAT, chat)):
        for field, values in fields.items():
            for i, value in enumerate(values):
                yield _post(f"{path}/type-{field}-{i}", path, {**make(model), field: value})


def _non_objects() -> Iterator[Case]:
    for i, text in enumerate(["[]", "[1]", '"text"', "1", "null", "true", "1.5", '[{"model":"demo"}]']):
        yield _post(f"completions/non-object-{i}", COMPLETIONS, text.encode())
        yield _post(f"chat/non-object-{i}", CHAT, text.encode())


def _non_utf8(model: str) -> Iterator[Case]:
    bad_bytes = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                 b"\x80", b"caf\xe9"]
    for path, make in ((COMPLETIONS, completion), (CHAT, chat)):
        raw = json.dumps(make(model, user="__BYTES__")).encode()
        for i, bad in enumerate(bad_bytes):
            yield _post(f"{path}/non-utf8-value-{i}", path, raw.replace(b"__BYTES__", bad))
            # In a key: `model`'s, so that bytes Python's decoder lets through (an encoded
            # surrogate, \xed\xa0\x80) still leave a request without a model.
            yield _post(f"{path}/non-utf8-key-{i}", path, raw.replace(b'"model"', b'"' + bad + b'"'))
        yield _post(f"{path}/non-utf8-latin1", path,
                    json.dumps(make(model, user="é"), ensure_ascii=False).encode("latin-1"))
    # Lone surrogates: valid JSON escapes, but no Unicode text (the tokenizer refuses them).
    for i, escape in enumerate(["\\ud800", "\\udfff", "a\\ud83d", "\\udc00\\ud800"]):
        yield _post(f"completions/lone-surrogate-prompt-{i}", COMPLETIONS,
                    _splice(completion(model), "prompt", f'"{escape}"'))
        yield _post(f"completions/lone-surrogate-model-{i}", COMPLETIONS,
                    _splice(completion(model), "model", f'"{escape}"'))
        yield _post(f"completions/lone-surrogate-stop-{i}", COMPLETIONS,
                    _splice(completion(model), "stop", f'["{escape}"]'))
        yield _post(f"chat/lone-surrogate-content-{i}", CHAT,
                    _splice(chat(model), "messages", f'[{{"role":"user","content":"{escape}"}}]'))


def _deep_nesting(model: str) -> Iterator[Case]:
    for depth in (64, 500, 2000, 20_000, 100_000):
        arrays, objects = "[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth
        yield _post(f"completions/deep-array-body-{depth}", COMPLETIONS, arrays.encode())
        yield _post(f"completions/deep-object-body-{depth}", COMPLETIONS, objects.encode())
        yield _post(f"completions/deep-prompt-{depth}", COMPLETIONS,
                    _splice(completion(model), "prompt", arrays))
        yield _post(f"chat/deep-messages-{depth}", CHAT, _splice(chat(model), "messages", arrays))
        yield _post(f"chat/deep-content-{depth}", CHAT,
                    _splice(chat(model), "messages", f'[{{"role":"user","content":{arrays}}}]'))
        # Deep, but in a field that is ignored or takes anything: parsed (or refused) without harm;
        # max_tokens 0 keeps the request from the engine.
        yield _post(f"completions/deep-unknown-field-{depth}", COMPLETIONS,
                    _splice(completion(model, max_tokens=0), "x_extra", objects))
        yield _post(f"chat/deep-tools-{depth}", CHAT, _splice(chat(model, max_tokens=0), "tools", arrays))


_HUGE = ["1e308", "-1e308", "1e309", "-1e309", "1" + "0" * 30, "-1" + "0" * 30, "9" * 4000, "9" * 5000,
         "1e-400"]
_HUGE_FIELDS = {
    COMPLETIONS: ["max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "logprobs", "best_of",
                  "presence_penalty"],
    CHAT: ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n",
           "top_logprobs", "frequency_penalty"],
}


def _huge_numbers(model: str) -> Iterator[Case]:
    for path, make in ((COMPLETIONS, completion), (CHAT, chat)):
        for field in _HUGE_FIELDS[path]:
            for i, number in enumerate(_HUGE):
                if number == "1e-400" and field in ("temperature", "min_p", "presence_penalty",
                                                    "frequency_penalty"):
                    continue  # underflows to 0.0, a valid value there
                yield _post(f"{path}/huge-{field}-{i}", path, _splice(make(model), field, number))
        yield _post(f"{path}/huge-stop-token-id", path,
                    _splice(make(model), "stop_token_ids", f"[{'9' * 400}]"))
    yield _post("completions/huge-token-id", COMPLETIONS,
                _splice(completion(model), "prompt", f"[{'9' * 400}]"))
    yield _post("completions/huge-token-id-nested", COMPLETIONS,
                _splice(completion(model), "prompt", f"[[1, {'9' * 4000}]]"))


def _nan_and_infinity(model: str) -> Iterator[Case]:
    fields = {COMPLETIONS: ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                            "max_tokens", "seed", "top_k"],
              CHAT: ["temperature", "top_p", "min_p", "presence_penalty", "max_completion_tokens", "n"]}
    for path, make in ((COMPLETIONS, completion), (CHAT, chat)):
        for field in fields[path]:
            for literal in ("NaN", "Infinity", "-Infinity"):
                yield _post(f"{path}/{literal}-{field}", path, _splice(make(model), field, literal))
        yield _post(f"{path}/NaN-logit-bias", path, _splice(make(model), "logit_bias", '{"1": NaN}'))


_OUT_OF_RANGE = [
    ("temperature", -0.01), ("temperature", 2.01), ("temperature", -1e-9), ("top_p", 0), ("top_p", -0.5),
    ("top_p", 1.0000001), ("top_k", -2), ("top_k", -(2**40)), ("min_p", -0.1), ("min_p", 1.5), ("n", 0),
    ("n", -1), ("n", MAX_N + 1), ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 5000),
    ("max_tokens", MAX_INT32), ("seed", 2**64), ("seed", -(2**63) - 1), ("stop", [""]), ("stop", ""),
    ("stop_token_ids", [-1]), ("presence_penalty", 0.5), ("frequency_penalty", -2.0),
    ("logit_bias", {"1": 5.0}), ("stream_options", {"include_usage": True}),
]


def _out_of_range(model: str) -> Iterator[Case]:
    for i, (field, value) in enumerate(_OUT_OF_RANGE):
        yield from _both(f"range-{field}-{i}", model, **{field: value})
    for i, (field, value) in enumerate([("logprobs", 6), ("logprobs", -1), ("logprobs", 1), ("best_of", 3),
                                        ("echo", True), ("suffix", "tail")]):
        yield _post(f"completions/range-{field}-{i}", COMPLETIONS, completion(model, **{field: value}))
    for i, (field, value) in enumerate([("top_logprobs", 21), ("top_logprobs", -1), ("top_logprobs", 2),
                                        ("max_completion_tokens", 0), ("max_completion_tokens", 99_999),
                                        ("tools", [{"type": "function"}])]):
        yield _post(f"chat/range-{field}-{i}", CHAT, chat(model, **{field: value}))


_UNKNOWN = [
    {"__proto__": {"admin": True}}, {"constructor": {"prototype": {}}}, {"$where": "1==1"},
    {"model ": "x"}, {"MODEL": "demo"}, {"": ""}, {"x" * 1000: 1}, {"unknown": [None] * 100},
    {"functions": [{"name": "f"}]}, {"response_format": {"type": "json_object"}}, {"extra_body": {"a": 1}},
    {"prompt\u0000": "x"}, {"\u202e": 1}, {"a.b.c": {"d": [1, {"e": None}]}}, {"stream_": True},
]


def _unknown_fields() -> Iterator[Case]:
    # Unknown fields are ignored, as OpenAI does; the body also lacks `model`, so it is refused
    # for that and never reaches the engine, whatever the unknown fields hold.
    for i, extra in enumerate(_UNKNOWN):
        yield _post(f"completions/unknown-{i}", COMPLETIONS, {"prompt": "Hello", "max_tokens": 2, **extra})
        yield _post(f"chat/unknown-{i}", CHAT, {"messages": [{"role": "user", "content": "Hi"}], **extra})


_BAD_MESSAGES = [
    [], [{}], [{"role": "user"}], [{"content": "hi"}], [{"role": "assistant", "content": "hi"}],
    [{"role": "system", "content": "be brief"}], [{"role": "user", "content": [{"type": "image_url"}]}],
    [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"text": "hi"}]}],
    [{"role": "user", "content": None}], [{"role": None, "content": "hi"}], [{"role": "", "content": "hi"}],
    [{"role": "tool", "content": "hi"}], [{"role": "R" * 3000, "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "hi", "name": 1}],
    [{"role": "user", "content": [{"type": "text", "text": 1}]}],
]


def _empty_messages(model: str) -> Iterator[Case]:
    for i, messages in enumerate(_BAD_MESSAGES):
        yield _post(f"chat/messages-{i}", CHAT, chat(model, messages=messages))
    for i, prompt in enumerate([[], [[]], [[1], []], [""], "", None]):
        if prompt in ([""], ""):
            # An empty text prompt is still a prompt (BOS); max_tokens 0 keeps it from the engine.
            yield _post(f"completions/empty-prompt-{i}", COMPLETIONS,
                        completion(model, prompt=prompt, max_tokens=0))
        else:
            yield _post(f"completions/empty-prompt-{i}", COMPLETIONS, completion(model, prompt=prompt))
    body = completion(model)
    del body["prompt"]
    yield _post("completions/no-prompt", COMPLETIONS, body)
    body = chat(model)
    del body["messages"]
    yield _post("chat/no-messages", CHAT, body)
    yield _post("completions/no-model", COMPLETIONS, {"prompt": "Hello"})
    yield _post("completions/empty-object", COMPLETIONS, {})
    yield _post("chat/empty-object", CHAT, {})


def _out_of_vocabulary(model: str, vocab_size: int) -> Iterator[Case]:
    for i, prompt in enumerate([[vocab_size], [1, vocab_size + 1], [-1], [MAX_INT32], [MAX_INT32 + 1],
                                [[1, 2], [vocab_size]], [[-5]], [1] * 10 + [vocab_size * 10]]):
        yield _post(f"completions/oov-{i}", COMPLETIONS, completion(model, prompt=prompt))


def _over_limits(model: str) -> Iterator[Case]:
    yield from _both("limit-n", model, n=MAX_N + 1)
    yield from _both("limit-stop-count", model, stop=[f"s{i}" for i in range(MAX_STOP + 1)])
    yield from _both("limit-stop-chars", model, stop=["x" * (MAX_STOP_CHARS + 1)])
    yield from _both("limit-stop-chars-single", model, stop="y" * (MAX_STOP_CHARS + 1))
    yield from _both("limit-stop-token-ids", model, stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
    yield _post("completions/limit-choices", COMPLETIONS,
                completion(model, prompt=["p"] * (MAX_CHOICES // 2 + 1), n=2))
    yield _post("completions/limit-prompts", COMPLETIONS, completion(model, prompt=["p"] * (MAX_CHOICES + 1)))
    yield _post("completions/limit-context-ids", COMPLETIONS, completion(model, prompt=[5] * 5000))
    yield _post("completions/limit-context-text", COMPLETIONS, completion(model, prompt="word " * 5000))
    # Text that cannot fit whatever the tokenizer does is refused before tokenizing (seconds of CPU).
    yield _post("completions/limit-prompt-chars", COMPLETIONS, completion(model, prompt="word " * 180_000))
    yield _post("completions/limit-prompt-chars-list", COMPLETIONS,
                completion(model, prompt=["short", "word " * 180_000]))
    parts = [{"type": "text", "text": "w " * 400_000}]
    yield _post("chat/limit-prompt-chars", CHAT, chat(model, messages=[{"role": "user", "content": parts}]))
    yield _post("chat/limit-messages", CHAT,
                chat(model, messages=[{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1)))
    yield _post("chat/limit-context", CHAT,
                chat(model, messages=[{"role": "user", "content": "word " * 5000}]))
    yield _post("completions/limit-long-model", COMPLETIONS, completion("M" * 20_000), status=404)


def _oversized(model: str) -> Iterator[Case]:
    for size in (MAX_BODY_BYTES + 1, 2 * MAX_BODY_BYTES, 4 * MAX_BODY_BYTES):
        body = json.dumps(completion(model, prompt="")).encode()
        pad = size - len(body)
        yield _post(f"completions/oversized-{size}", COMPLETIONS,
                    json.dumps(completion(model, prompt="z" * pad)).encode(), status=413)
    long_message = [{"role": "user", "content": "q" * (MAX_BODY_BYTES + 10)}]
    yield _post("chat/oversized", CHAT, json.dumps(chat(model, messages=long_message)).encode(), status=413)
    yield _post("completions/oversized-garbage", COMPLETIONS, b"\xff" * (MAX_BODY_BYTES + 1), status=413)
    yield _post("completions/oversized-deep", COMPLETIONS, b"[" * (MAX_BODY_BYTES + 1), status=413)


def _methods_and_paths(model: str) -> Iterator[Case]:
    for path in (COMPLETIONS, CHAT):
        for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
            yield Case(f"{path}/method-{method}", method, path, JSON, b"", 405)
    for method in ("POST", "PUT", "DELETE"):
        yield Case(f"/v1/models/method-{method}", method, "/v1/models", JSON, b"{}", 405)
    for i, path in enumerate(["/v1", "/v1/", "/v2/completions", "/v1/completion", "/v1/completions/extra",
                              "/V1/COMPLETIONS", "/v1/chat", "/v1/engines", "/v1/embeddings",
                              "/%2e%2e/etc/passwd", "/v1/../../etc/passwd", "/v1/completions%00",
                              "/" + "a" * 5000, "/v1/" + "%ff" * 10]):
        yield Case(f"path-{i}", "POST" if i % 2 else "GET", path, JSON, b"{}", 404)
    for i, model_id in enumerate(["no-such-model", "M" * 5000, "%00", "..%2f..%2fetc", "%F0%9F%92%A9",
                                  "a/b/c"]):
        yield Case(f"models/retrieve-{i}", "GET", f"/v1/models/{model_id}", (), b"", 404)


def _content_types(model: str) -> Iterator[Case]:
    body = json.dumps(completion(model, max_tokens=0)).encode()
    for i, ctype in enumerate(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                               "application/xml", "application/json; charset=latin-1", ""]):
        yield _post(f"completions/content-type-{i}", COMPLETIONS, body, headers=(("content-type", ctype),))
    yield _post("completions/form-body", COMPLETIONS, b"model=demo&prompt=x",
                headers=(("content-type", "application/x-www-form-urlencoded"),))


def _authentication(model: str, api_key: str) -> Iterator[Case]:
    bad = [(), (("authorization", "Bearer wrong"),), (("authorization", f"Basic {api_key}"),),
           (("authorization", "Bearer"),), (("authorization", f"Bearer {api_key}x"),),
           (("authorization", f"Bearer {api_key[:-1]}"),), (("authorization", api_key),),
           (("x-api-key", api_key),), (("authorization", "Bearer " + "k" * 5000),)]
    body = json.dumps(completion(model)).encode()
    for i, headers in enumerate(bad):
        yield Case(f"auth/completions-{i}", "POST", COMPLETIONS, JSON + headers, body, 401, keyless=True)
        yield Case(f"auth/models-{i}", "GET", "/v1/models", headers, b"", 401, keyless=True)
        # Refused before the body is read: garbage or an oversized body without the key is a 401 too.
        yield Case(f"auth/garbage-{i}", "POST", CHAT, JSON + headers, b"\xff{", 401, keyless=True)
    yield Case("auth/oversized", "POST", COMPLETIONS, JSON, b"x" * (2 * MAX_BODY_BYTES), 401, keyless=True)
    yield Case("auth/unknown-route", "GET", "/v1/secret", (), b"", 401, keyless=True)
    yield Case("auth/openapi", "GET", "/openapi.json", (), b"", 401, keyless=True)
    yield Case("auth/docs", "GET", "/docs", (), b"", 401, keyless=True)
