"""Deadlines and clients that go away (DESIGN.md §5): a request past its deadline gets 408 with
an OpenAI error body (a started stream: an error event, then `[DONE]`) or gRPC
DEADLINE_EXCEEDED, and its sequence is aborted; a client that disconnects or cancels frees its
sequence. Every test ends by checking, through the engine deployment's `stats()`, that no
sequence runs or waits and no KV block is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import httpx
import openai
import pytest

from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.grpc_stubs import moe_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import Server, run_app
from tests.e2e.serve_grpc import engine_handle, wait_until_idle

LONG = 3000  # tokens: no request here gets to finish on its own
NUM_GONE = 100  # clients that go away in the disconnect test
CONCURRENCY = 10  # of them at a time: below the app's capacity, so none is shed
SERVER_TIMEOUT_S = 15.0  # the app's request_timeout_s: far shorter than LONG tokens take here


@pytest.fixture(scope="module")
def server(serve_instance, demo_model_dir) -> Server:
    from gateway.app import ServeOptions

    options = ServeOptions(model_dir=str(demo_model_dir), model_name="demo", num_expert_workers=0,
                           num_cpus_per_worker=0.25, max_num_seqs=16, num_kv_blocks=1024,
                           max_queued_requests=64, request_timeout_s=SERVER_TIMEOUT_S)
    return run_app(serve_instance, options, "deadlines", "/")


@pytest.fixture(scope="module")
def stub(server, grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield pb_grpc.MoeServeStub(channel)


def long_completion(server: Server, **fields) -> dict:
    return {"model": server.model_name, "prompt": "Deadlines", "max_tokens": LONG, "temperature": 0,
            "ignore_eos": True, **fields}


def long_generate() -> pb.GenerateRequest:
    return pb.GenerateRequest(text="Deadlines", sampling=pb.SamplingParams(max_tokens=LONG, temperature=0,
                                                                          ignore_eos=True))


def generated_tokens(server: Server) -> int:
    return engine_handle(server.app_name).stats.remote().result().num_generated_tokens


# -- deadlines ----------------------------------------------------------------------------------


def test_past_its_deadline_a_request_gets_408_and_is_aborted(server):
    before = generated_tokens(server)
    resp = httpx.post(f"{server.base_url}/completions", json=long_completion(server),
                      headers={"X-Request-Timeout": "1.5"}, timeout=120)
    assert resp.status_code == 408, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("timeout_error", "timeout") and "deadline" in error["message"]
    stats = wait_until_idle(server.app_name)
    assert 0 < stats.num_generated_tokens - before < LONG  # it ran, and was stopped


def test_the_official_client_sees_the_408(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=server.model_name, prompt="Deadlines", max_tokens=LONG,
                                  extra_headers={"X-Request-Timeout": "1"}, extra_body={"ignore_eos": True})
    assert err.value.status_code == 408 and err.value.body["code"] == "timeout"
    wait_until_idle(server.app_name)


def test_the_servers_deadline_applies_and_a_client_cannot_extend_it(server):
    resp = httpx.post(f"{server.base_url}/completions", json=long_completion(server),
                      headers={"X-Request-Timeout": "600"}, timeout=120)
    assert resp.status_code == 408, resp.text
    assert f"{SERVER_TIMEOUT_S:g} s deadline" in resp.json()["error"]["message"]
    wait_until_idle(server.app_name)


def test_a_started_stream_ends_with_a_timeout_event_then_done(server):
    with httpx.stream("POST", f"{server.base_url}/completions", json=long_completion(server, stream=True),
                      headers={"X-Request-Timeout": "1.5"}, timeout=120) as resp:
        assert resp.status_code == 200
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("choices" in c for c in chunks[:-1]) and len(chunks) > 1  # tokens came first
    assert chunks[-1]["error"]["code"] == "timeout"
    wait_until_idle(server.app_name)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_a_bad_timeout_header_is_400(server, value):
    resp = httpx.post(f"{server.base_url}/completions", json=long_completion(server, max_tokens=1),
                      headers={"X-Request-Timeout": value}, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "X-Request-Timeout"


def test_a_generous_deadline_changes_nothing(server):
    resp = httpx.post(f"{server.base_url}/completions", json=long_completion(server, max_tokens=8),
                      headers={"X-Request-Timeout": "120"}, timeout=120)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 8


def test_grpc_client_deadline_aborts_the_sequence(server, stub):
    before = generated_tokens(server)
    for call in (lambda: stub.Generate(long_generate(), timeout=1.5),
                 lambda: list(stub.GenerateStream(long_generate(), timeout=1.5))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = wait_until_idle(server.app_name)
    assert 0 < stats.num_generated_tokens - before < 2 * LONG


def test_grpc_timeout_metadata_is_enforced_by_the_server(server, stub):
    """The server's own deadline (not the client's): the status comes from the engine replica."""
    metadata = (("x-request-timeout", "1.5"),)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(long_generate(), metadata=metadata, timeout=120)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(long_generate(), metadata=metadata, timeout=120))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(long_generate(), metadata=(("x-request-timeout", "never"),), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    wait_until_idle(server.app_name)


# -- clients that go away -----------------------------------------------------------------------


def test_a_hundred_clients_that_go_away_leave_nothing_behind(server):
    """HTTP streams closed after their first chunk and non-streaming requests whose client
    times out: all 100 sequences are freed at once, without waiting for a deadline."""
    before = generated_tokens(server)

    async def stream_closed(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", f"{server.base_url}/completions",
                                 json=long_completion(server, stream=True)) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    return  # leaving the block closes the connection

    async def client_timeout(client: httpx.AsyncClient) -> None:
        with contextlib.suppress(httpx.ReadTimeout):
            await client.post(f"{server.base_url}/completions", json=long_completion(server), timeout=0.5)
            raise AssertionError("a 3000-token completion finished in 0.5 s")

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)) as client:
            for start in range(0, NUM_GONE, CONCURRENCY):
                await asyncio.gather(*[(stream_closed, client_timeout)[i % 2](client)
                                       for i in range(start, start + CONCURRENCY)])

    asyncio.run(main())
    stats = wait_until_idle(server.app_name, timeout_s=30)
    assert stats.num_generated_tokens - before < NUM_GONE * LONG // 10  # all stopped early
    resp = httpx.post(f"{server.base_url}/completions", json=long_completion(server, max_tokens=4),
                      timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4


def cancel_after_first_message(stub, metadata=()) -> None:
    stream = stub.GenerateStream(long_generate(), metadata=metadata, timeout=120)
    next(stream)
    stream.cancel()


def test_cancelled_grpc_streams_end_by_their_deadline_at_the_latest(server, stub):
    """Cancelled gRPC streams free their sequences (gateway/grpc_cancel.py), and with a deadline
    set none can outlive it in any case: every cancelled stream is gone by its deadline."""
    before = generated_tokens(server)
    metadata = (("x-request-timeout", "4"),)

    async def main() -> None:
        for _ in range(2):
            await asyncio.gather(*[asyncio.to_thread(cancel_after_first_message, stub, metadata)
                                   for _ in range(CONCURRENCY)])

    asyncio.run(main())
    stats = wait_until_idle(server.app_name, timeout_s=60)
    assert stats.num_generated_tokens - before < 2 * CONCURRENCY * LONG // 10
