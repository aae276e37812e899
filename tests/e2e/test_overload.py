"""Overload is shed early (DESIGN.md §5): a burst far past capacity gets 429 with `Retry-After`
(gRPC RESOURCE_EXHAUSTED) at once, whichever queue is full, nothing else fails, and the server
serves the next requests normally.

Capacity is explicit: the app runs MAX_NUM_SEQS sequences and lets MAX_QUEUED_REQUESTS wait
(the single-process engine, so the test measures admission, not the expert group).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest

from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.grpc_stubs import moe_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import Server, run_app
from tests.e2e.serve_grpc import wait_until_idle

MAX_NUM_SEQS = 2
MAX_QUEUED_REQUESTS = 4
CAPACITY = MAX_NUM_SEQS + MAX_QUEUED_REQUESTS
BURST = 10 * CAPACITY
MAX_TOKENS = 192  # long enough that admitted requests are still running when the burst ends


@pytest.fixture(scope="module")
def server(serve_instance, demo_model_dir) -> Server:
    from gateway.app import ServeOptions

    options = ServeOptions(model_dir=str(demo_model_dir), model_name="demo", num_expert_workers=0,
                           num_cpus_per_worker=0.25, max_num_seqs=MAX_NUM_SEQS, num_kv_blocks=256,
                           max_queued_requests=MAX_QUEUED_REQUESTS)
    return run_app(serve_instance, options, "overload", "/")


@pytest.fixture(scope="module")
def stub(server, grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield pb_grpc.MoeServeStub(channel)


def completion(server: Server, max_tokens: int = MAX_TOKENS) -> dict:
    return {"model": server.model_name, "prompt": "Overload", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}


def test_a_burst_of_ten_times_capacity_is_shed_early(server):
    async def burst() -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async def one() -> tuple[httpx.Response, float]:
                resp = await client.post(f"{server.base_url}/completions", json=completion(server))
                return resp, time.monotonic()
            return await asyncio.gather(*[one() for _ in range(BURST)])  # a client timeout raises here

    results = asyncio.run(burst())
    statuses = [resp.status_code for resp, _ in results]
    assert set(statuses) <= {200, 429}, statuses  # no 5xx, no other 4xx
    done = [t for resp, t in results if resp.status_code == 200]
    shed = [(resp, t) for resp, t in results if resp.status_code != 200]
    # The first MAX_QUEUED_REQUESTS to arrive always fit; the bulk of the rest cannot.
    assert len(done) >= MAX_QUEUED_REQUESTS
    assert len(shed) >= BURST // 2, f"{len(done)} admitted, {len(shed)} shed"
    for resp, _ in results:
        if resp.status_code == 200:
            assert resp.json()["usage"]["completion_tokens"] == MAX_TOKENS
            continue
        assert int(resp.headers["Retry-After"]) >= 1
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        # The engine replica's waiting queue is full, or Serve's queue in front of the replicas
        # (503 before the one front door; gRPC had RESOURCE_EXHAUSTED for both).
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
        assert "overloaded" in error["message"]
    # Early: every refusal came back before the first admitted request finished, i.e. none of
    # them waited for a slot.
    assert max(t for _, t in shed) < min(done)
    margin_s = min(done) - max(t for _, t in shed)
    print(f"burst of {BURST}: {len(done)} admitted, {statuses.count(429)} × 429; last refusal "
          f"{margin_s:.2f} s before the first completion")
    wait_until_idle(server.app_name)
    # ... and the server is fine afterwards.
    with httpx.Client(timeout=120) as client:
        for _ in range(3):
            resp = client.post(f"{server.base_url}/completions", json=completion(server, max_tokens=8))
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 8


def test_a_grpc_burst_gets_resource_exhausted(server, stub):
    request = pb.GenerateRequest(text="Overload", sampling=pb.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    calls = [stub.Generate.future(request, timeout=120) for _ in range(5 * CAPACITY)]
    for call in calls:  # grpc's futures are not concurrent.futures': wait on each
        call.exception(timeout=180)
    codes = [call.code() for call in calls]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    ok = [call.result() for call in calls if call.code() == grpc.StatusCode.OK]
    assert len(ok) >= MAX_QUEUED_REQUESTS and all(r.usage.completion_tokens == MAX_TOKENS for r in ok)
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2 * CAPACITY, codes
    exhausted = next(call for call in calls if call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "overloaded" in exhausted.details()
    wait_until_idle(server.app_name)
    assert stub.Generate(pb.GenerateRequest(text="after", sampling=pb.SamplingParams(max_tokens=4)),
                         timeout=60).usage.completion_tokens == 4
