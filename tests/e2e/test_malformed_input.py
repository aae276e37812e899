"""Malformed requests against the live server: every one gets its documented 4xx or gRPC status.

One Serve application (single-process engine, an API key, at "/") takes the whole corpus of
`tests/e2e/malformed_corpus.py` over HTTP (httpx) and over gRPC (grpcio's generic calls, which
send raw bytes, so the messages need not be protobuf at all). Each answer must be the case's
status, with OpenAI's error body (HTTP) or a short status detail (gRPC): bounded in size, no
traceback or file path, and no more than a short prefix of any input echoed back. After the
corpus the server must still answer a valid request.
"""

from __future__ import annotations

import json
from collections import Counter

import grpc
import httpx
import pytest

from tests.e2e.conftest import API_KEY, Server, run_app
from tests.e2e.malformed_corpus import Case, http_cases
from tests.e2e.malformed_grpc_corpus import GrpcCase, grpc_cases
from workers.weights.config import ModelConfig

MAX_ERROR_BODY_BYTES = 2048
ECHO_WINDOW = 64  # no 64 bytes of the request may come back (so at most ~2 windows' worth of echo)
DOCUMENTED_HTTP = {400, 401, 404, 405, 413}
DOCUMENTED_GRPC = {"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "UNIMPLEMENTED"}


@pytest.fixture(scope="module")
def server(serve_instance, demo_model_dir) -> Server:
    from gateway.app import ServeOptions

    options = ServeOptions(model_dir=str(demo_model_dir), model_name="demo", num_expert_workers=0,
                           num_cpus_per_worker=0.25, max_num_seqs=8, num_kv_blocks=256, api_key=API_KEY)
    return run_app(serve_instance, options, "hardening", "/")


@pytest.fixture(scope="module")
def vocab_size(demo_model_dir) -> int:
    return ModelConfig.from_dir(demo_model_dir).vocab_size


def echoed(request: bytes, response: bytes) -> bytes | None:
    """A window of ECHO_WINDOW bytes of `response` found in `request`, or None.

    Windows start every ECHO_WINDOW // 2 bytes, so any echo of 1.5 windows or more is caught.
    """
    step = ECHO_WINDOW // 2
    for start in range(0, max(len(response) - ECHO_WINDOW, 0) + 1, step):
        window = response[start:start + ECHO_WINDOW]
        if len(window) == ECHO_WINDOW and window in request:
            return window
    return None


def http_problems(case: Case, resp: httpx.Response) -> list[str]:
    problems = []
    if resp.status_code != case.status:
        problems.append(f"status {resp.status_code}, expected {case.status}")
    if resp.status_code not in DOCUMENTED_HTTP:
        problems.append(f"undocumented status {resp.status_code}")
    if len(resp.content) > MAX_ERROR_BODY_BYTES:
        problems.append(f"body of {len(resp.content)} bytes")
    if not resp.headers.get("content-type", "").startswith("application/json"):
        problems.append(f"content-type {resp.headers.get('content-type')!r}")
    try:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        assert error["message"] and isinstance(error["type"], str)
    except Exception:
        problems.append(f"not an OpenAI error body: {resp.content[:200]!r}")
    for leak in (b"Traceback", b"/work/", b".py", b'File "', API_KEY.encode()):
        if leak in resp.content:
            problems.append(f"leaks {leak!r}")
    if window := echoed(case.body + case.path.encode() + repr(case.headers).encode(), resp.content):
        problems.append(f"echoes the request: {window!r}")
    return problems


def test_the_corpus_covers_every_category_with_at_least_500_cases(vocab_size):
    cases = http_cases("demo", API_KEY, vocab_size)
    assert len(cases) >= 500
    categories = Counter(c.name.rsplit("/", 1)[-1].split("-")[0] for c in cases)
    for category in ("invalid", "truncated", "type", "non", "lone", "deep", "huge", "NaN", "Infinity",
                     "range", "unknown", "messages", "empty", "oov", "limit", "oversized", "method", "path",
                     "content"):
        assert categories[category] >= 1, category
    assert Counter(c.status for c in cases).keys() == DOCUMENTED_HTTP
    assert len(grpc_cases(vocab_size)) >= 50


def test_every_malformed_http_request_gets_its_documented_4xx(server, vocab_size):
    failures = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for case in http_cases(server.model_name, API_KEY, vocab_size):
            headers = dict(case.headers)
            if not case.keyless:
                headers["authorization"] = f"Bearer {API_KEY}"
            resp = client.request(case.method, case.path, content=case.body, headers=headers)
            if problems := http_problems(case, resp):
                failures[case.name] = problems
        assert not failures, json.dumps(dict(list(failures.items())[:20]), indent=1)
        # ...and the server still works.
        ok = client.post("/v1/completions", headers={"authorization": f"Bearer {API_KEY}"},
                         json={"model": server.model_name, "prompt": "Hello", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 2


def grpc_problems(case: GrpcCase, err: grpc.RpcError | None) -> list[str]:
    if err is None:
        return ["the call succeeded"]
    code, details = err.code().name, err.details() or ""
    problems = []
    if code != case.status:
        problems.append(f"status {code}, expected {case.status}")
    if code not in DOCUMENTED_GRPC:
        problems.append(f"undocumented status {code}")
    if len(details) > MAX_ERROR_BODY_BYTES:
        problems.append(f"details of {len(details)} characters")
    for leak in ("Traceback", "/work/", ".py", 'File "', API_KEY):
        if leak in details:
            problems.append(f"leaks {leak!r}")
    if window := echoed(case.body, details.encode()):
        problems.append(f"echoes the request: {window!r}")
    return problems


def test_every_malformed_grpc_message_gets_its_documented_status(server, grpc_port, vocab_size):
    auth = (("authorization", f"Bearer {API_KEY}"),)
    failures = {}
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        for case in grpc_cases(vocab_size):
            # No serializers: the bytes go out as they are, and the answer comes back as bytes.
            bidi = case.method.endswith("Info")
            streaming = bidi or case.method.endswith("Stream")
            call = (channel.stream_stream if bidi else channel.unary_stream if streaming
                    else channel.unary_unary)(case.method)
            err = None
            try:
                result = call(iter([case.body]) if bidi else case.body, metadata=auth, timeout=30)
                if streaming:
                    list(result)
            except grpc.RpcError as exc:
                err = exc
            if problems := grpc_problems(case, err):
                failures[case.name] = problems
        assert not failures, json.dumps(dict(list(failures.items())[:20]), indent=1)
        from gateway.grpc_stubs import moe_serve_pb2 as pb

        ok = channel.unary_unary("/moe_serve.v1.MoeServe/Generate",
                                 response_deserializer=pb.GenerateResponse.FromString)(
            pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(max_tokens=2)).SerializeToString(),
            metadata=auth, timeout=60)
        assert ok.usage.completion_tokens == 2
