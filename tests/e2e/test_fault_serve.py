"""Worker faults through the real Serve app (DESIGN.md §5, §6): clients only see the promise.

A worker process of the engine's model group is SIGKILLed while requests stream:
- recoverable (the default policy): 50 greedy streams through the official `openai` client
  all finish with the text of a fault-free run, the fault and the recovery show in metrics,
  and the group keeps serving;
- unrecoverable (`max_recoveries=0`): every request in flight ends explicitly (an HTTP 503 with
  an OpenAI error body, an SSE error event then `[DONE]`, gRPC UNAVAILABLE), `/ready` turns
  503 and gRPC health NOT_SERVING within seconds, and new requests get 503 / UNAVAILABLE.

Each test deploys its own app and deletes it after, so the model group's workers found in
Ray's actor table are that app's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.grpc_stubs import moe_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import free_port, run_app

NUM_REQUESTS = 50
MAX_TOKENS = 32
RUN_DEADLINE_S = 240.0


@pytest.fixture(scope="module")
def ports():
    return {"grpc": free_port(), "metrics": free_port()}


@pytest.fixture(scope="module")
def serve_instance(ports):
    """Ray on loopback exporting metrics, Serve with our gRPC services (as `moe-serve serve`)."""
    import ray
    from ray import serve

    from gateway.grpc_stubs import servicer_functions

    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False, _metrics_export_port=ports["metrics"],
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                grpc_options={"port": ports["grpc"], "grpc_servicer_functions": servicer_functions()})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def deploy(url: str, model_dir, name: str, **options):
    """The app as `moe-serve serve` builds it; the model is named after the app (metrics labels)."""
    from gateway.app import ServeOptions

    opts = ServeOptions(model_dir=str(model_dir), model_name=name, num_attention_workers=1,
                        num_expert_workers=2, num_cpus_per_worker=0.25, max_num_seqs=64, num_kv_blocks=512,
                        **options)
    return run_app(url, opts, name, "/")


def expert_pids() -> list[int]:
    """The live expert workers' pids, from the GCS actor table (the workers belong to the replica)."""
    from ray._private import state

    return sorted(a["Pid"] for a in state.actors().values()
                  if a["ActorClassName"].endswith("ExpertWorker") and a["State"] == "ALIVE")


def prompt(i: int) -> str:
    return f"Request {i}: the {['red', 'green', 'blue', 'old', 'quick'][i % 5]} fox said {i * 7}"


async def stream_all(server, on_chunk=None) -> list[tuple[str, str]]:
    """NUM_REQUESTS greedy streams at once through the openai client; (text, finish_reason) each."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                                timeout=RUN_DEADLINE_S)

    async def one(i: int) -> tuple[str, str]:
        text, finish = "", None
        stream = await client.completions.create(model=server.model_name, prompt=prompt(i),
                                                 max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            if on_chunk is not None:
                on_chunk()
        return text, finish

    try:
        return await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(NUM_REQUESTS)]), RUN_DEADLINE_S)
    finally:
        await client.close()


def scrape(url: str, model: str) -> dict[str, float]:
    """'name{label=value,...}' → value, for `model`'s fault families."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for s in fam.samples:
            if s.labels.get("model") == model and any(w in s.name for w in ("fault", "recover", "restart",
                                                                            "repair", "expert_plane")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k in
                                  ("rank", "kind", "cause", "outcome", "repair"))
                out[f"{s.name}{{{labels}}}"] = out.get(f"{s.name}{{{labels}}}", 0) + s.value
    return out


def test_sigkill_expert_while_50_streams_run_recovers_with_identical_text(serve_instance, demo_model_dir,
                                                                          ports):
    from ray import serve

    server = deploy(serve_instance, demo_model_dir, "faults-recover")
    try:
        want = asyncio.run(stream_all(server))  # fault-free
        assert all(finish == "length" for _, finish in want)

        (victim, _other) = expert_pids()
        seen = {"chunks": 0, "killed": False}

        def on_chunk():
            seen["chunks"] += 1
            if seen["chunks"] == NUM_REQUESTS * 6 and not seen["killed"]:  # every stream is mid-way
                os.kill(victim, signal.SIGKILL)
                seen["killed"] = True

        got = asyncio.run(stream_all(server, on_chunk))
        assert seen["killed"]
        assert got == want  # same greedy text, every request finished with "length"
        assert victim not in expert_pids()

        # The group keeps serving, and is ready again.
        assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        again = client.completions.create(model=server.model_name, prompt=prompt(3), max_tokens=MAX_TOKENS,
                                          temperature=0.0, extra_body={"ignore_eos": True})
        assert again.choices[0].text == want[3][0]

        # Metrics name the failed worker's kind and cause, count the recovery, the repair and the
        # new worker the pool grew back with.
        url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        deadline = time.monotonic() + 60
        while True:
            m = scrape(url, server.model_name)
            if m.get("ray_moe_serve_expert_plane_events_total{kind=scale_up,outcome=done}") or \
                    time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert m.get("ray_moe_serve_recoveries_total{outcome=recovered}") == 1
        faults = {k: v for k, v in m.items() if k.startswith("ray_moe_serve_worker_faults_total")}
        assert len(faults) == 1 and "cause=died" in next(iter(faults)) and "kind=expert" in next(iter(faults))
        # Only the dead expert worker was replaced (issue 16: repair one worker, not the group): the
        # survivor took its experts at once, and a new worker joined in the background.
        assert m.get("ray_moe_serve_repairs_total{repair=expert_worker}") == 1
        assert m.get("ray_moe_serve_expert_plane_events_total{kind=repair,outcome=done}") == 1
        assert m.get("ray_moe_serve_expert_plane_events_total{kind=scale_up,outcome=done}") == 1
        assert not m.get("ray_moe_serve_worker_restarts_total{kind=attention}")
        assert m.get("ray_moe_serve_recovery_seconds_count{}") == 1
    finally:
        serve.delete("faults-recover")


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_unrecoverable_fault_ends_every_request_explicitly_and_turns_ready_red(serve_instance, demo_model_dir,
                                                                               ports):
    from ray import serve

    server = deploy(serve_instance, demo_model_dir, "faults-fatal", max_recoveries=0)
    long_body = {"model": server.model_name, "prompt": "Once upon a time", "max_tokens": 400,
                 "temperature": 0.0, "ignore_eos": True}
    results: dict[str, object] = {}
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.MoeServeStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING
        grpc_req = pb.GenerateRequest(text="Once upon a time", sampling=pb.SamplingParams(
            max_tokens=400, temperature=0.0, ignore_eos=True))

        def unary_http():
            results["http"] = httpx.post(f"{server.base_url}/completions", json=long_body,
                                         timeout=RUN_DEADLINE_S)

        def grpc_stream():
            try:
                results["grpc_msgs"] = sum(1 for _ in stub.GenerateStream(grpc_req, timeout=RUN_DEADLINE_S))
            except grpc.RpcError as exc:
                results["grpc"] = exc

        threads = [threading.Thread(target=unary_http), threading.Thread(target=grpc_stream)]
        for t in threads:
            t.start()
        with httpx.stream("POST", f"{server.base_url}/completions", json={**long_body, "stream": True},
                          timeout=RUN_DEADLINE_S) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = [next(lines) for _ in range(6)]  # a few tokens in: every request is in flight
            os.kill(expert_pids()[0], signal.SIGKILL)
            killed_at = time.monotonic()
            rest = list(lines)
        for t in threads:
            t.join(RUN_DEADLINE_S)
        assert time.monotonic() - killed_at < RUN_DEADLINE_S

        events = [json.loads(x.removeprefix("data: ")) if x != "data: [DONE]" else "[DONE]"
                  for x in first + rest if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == "service_unavailable" and "engine unavailable" in error["message"]
        assert all("choices" in e for e in events[:-2])  # tokens, then the error, then [DONE]

        http = results["http"]
        assert http.status_code == 503
        assert http.json()["error"]["type"] == "service_unavailable_error"
        assert "expert worker" in http.json()["error"]["message"]
        assert isinstance(results.get("grpc"), grpc.RpcError), results
        assert results["grpc"].code() == grpc.StatusCode.UNAVAILABLE

        # Readiness turns red within seconds; new requests are refused explicitly.
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/ready", timeout=10).status_code == 200:
            assert time.monotonic() < deadline, "/ready stayed 200 after an unrecoverable fault"
            time.sleep(0.2)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        late = httpx.post(f"{server.base_url}/completions", json={**long_body, "max_tokens": 4}, timeout=60)
        assert late.status_code == 503 and late.json()["error"]["code"] == "service_unavailable"
        late_stream = httpx.post(f"{server.base_url}/completions", json={**long_body, "stream": True},
                                 timeout=60)
        assert late_stream.status_code == 503
        with pytest.raises(grpc.RpcError) as late_grpc:
            stub.Generate(grpc_req, timeout=60)
        assert late_grpc.value.code() == grpc.StatusCode.UNAVAILABLE

        url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        deadline = time.monotonic() + 60
        while not scrape(url, server.model_name).get("ray_moe_serve_recoveries_total{outcome=refused}"):
            assert time.monotonic() < deadline, "the refused recovery never reached the metrics"
            time.sleep(1.0)
    finally:
        channel.close()
        serve.delete("faults-fatal")
