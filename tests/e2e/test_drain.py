"""Graceful drain (DESIGN.md §5): while an application drains, in-flight streams finish and new
requests get 503 + `Retry-After` (gRPC UNAVAILABLE, health NOT_SERVING, `/ready` 503); at the
drain deadline the streams still running end with an error event, never silently.

`drain_app` is what `moe-serve serve` runs on Ctrl-C / SIGTERM before deleting its application.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.drain import drain_app
from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.grpc_stubs import moe_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import Server, run_app
from tests.e2e.serve_grpc import wait_until_idle

NUM_STREAMS = 3
STREAM_TOKENS = 400  # long enough to still be running while the new requests are refused


@pytest.fixture(scope="module")
def channel(serve_instance, grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        yield ch


def start_app(url: str, model_dir, name: str) -> Server:
    from gateway.app import ServeOptions

    options = ServeOptions(model_dir=str(model_dir), model_name="demo", num_expert_workers=0,
                           num_cpus_per_worker=0.25, max_num_seqs=8, num_kv_blocks=512)
    return run_app(url, options, name, f"/{name}")


def completion(server: Server, max_tokens: int, stream: bool) -> dict:
    body = {"model": server.model_name, "prompt": "Drain", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    return body | {"stream_options": {"include_usage": True}} if stream else body


class StreamReader(threading.Thread):
    """Reads one SSE stream to its end: `started` after the first chunk; events and end time kept."""

    def __init__(self, server: Server, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.server, self.max_tokens = server, max_tokens
        self.started = threading.Event()
        self.events: list[str] = []
        self.status: int | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        with httpx.stream("POST", f"{self.server.base_url}/completions", timeout=120,
                          json=completion(self.server, self.max_tokens, stream=True)) as resp:
            self.status = resp.status_code
            for line in resp.iter_lines():
                if line:
                    self.events.append(line.removeprefix("data: "))
                    self.started.set()
        self.ended_at = time.monotonic()
        self.started.set()

    def chunks(self) -> list[dict]:
        assert self.events[-1] == "[DONE]"
        return [json.loads(e) for e in self.events[:-1]]


@contextmanager
def draining(app_name: str, timeout_s: float) -> Iterator[dict]:
    """Run `drain_app` in a thread; yields {"left": N} once it has returned (set by then), and
    keeps the signal alive (new requests refused) until the block ends."""
    done, release = threading.Event(), threading.Event()
    result: dict = {"done": done}

    def drain() -> None:
        with drain_app(app_name, timeout_s) as left:
            result["left"] = left
            done.set()
            release.wait(120)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        release.set()
        thread.join(60)


def assert_refused(server: Server) -> float:
    """A new request is refused with 503 + Retry-After and an OpenAI body; when it came back."""
    resp = httpx.post(f"{server.base_url}/completions", json=completion(server, 4, stream=False), timeout=60)
    assert resp.status_code == 503, resp.text
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.json()["error"]["code"] == "service_unavailable"
    assert "shutting down" in resp.json()["error"]["message"]
    return time.monotonic()


def test_in_flight_streams_finish_while_new_requests_get_503(serve_instance, demo_model_dir, channel):
    from ray import serve

    server = start_app(serve_instance, demo_model_dir, "drain")
    readers = [StreamReader(server, STREAM_TOKENS) for _ in range(NUM_STREAMS)]
    for reader in readers:
        reader.start()
    for reader in readers:
        assert reader.started.wait(60)
    with draining(server.app_name, timeout_s=120) as state:
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/ready", timeout=30).status_code != 503:
            assert time.monotonic() < deadline, "/ready stayed 200 while draining"
            time.sleep(0.1)
        refused_at = assert_refused(server)
        # gRPC too (the app is not the only one on the proxy: name it).
        metadata = (("application", server.app_name),)
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.MoeServeStub(channel).Generate(
                pb.GenerateRequest(text="Drain", sampling=pb.SamplingParams(max_tokens=4)),
                metadata=metadata, timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), metadata=metadata,
                                                           timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        for reader in readers:
            reader.join(120)
            assert reader.status == 200 and reader.ended_at > refused_at  # it ran on past the refusal
            chunks = reader.chunks()
            assert not any("error" in c for c in chunks)
            assert chunks[-1]["usage"]["completion_tokens"] == STREAM_TOKENS  # it ran to its end
            assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert state["done"].wait(60)
        assert state["left"] == 0
        assert_refused(server)  # still refused until the application is gone
        serve.delete(server.app_name)


def test_streams_still_running_at_the_drain_deadline_end_with_an_error_event(serve_instance,
                                                                              demo_model_dir):
    from ray import serve

    server = start_app(serve_instance, demo_model_dir, "drain-deadline")
    reader = StreamReader(server, max_tokens=3000)
    reader.start()
    assert reader.started.wait(60)
    with draining(server.app_name, timeout_s=2) as state:
        reader.join(120)
        chunks = reader.chunks()
        assert chunks[0]["choices"] and chunks[-1]["error"]["code"] == "service_unavailable"
        assert state["done"].wait(60)
        assert state["left"] == 0
        stats = wait_until_idle(server.app_name, timeout_s=30)
        assert stats.num_kv_blocks_used == 0
        serve.delete(server.app_name)
