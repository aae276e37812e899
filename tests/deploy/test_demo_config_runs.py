"""deploy/serve/demo.yaml really runs: deployed as `serve run` deploys a config, it serves the
OpenAI API and gRPC on the config's proxies, with the autoscaling the file asks for; and the
locustfile's stream reader agrees with a real SSE stream.
"""

from __future__ import annotations

import ast
import json

import grpc
import httpx
import openai
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.manifests import DEPLOY


def test_completion_through_the_configs_app(demo_deployment):
    client = openai.OpenAI(base_url=demo_deployment.base_url, api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [demo_deployment.model_name] == ["demo"]
    r = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=8,
                                  temperature=0.0)
    assert r.choices[0].text and r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    demo_deployment.completion_tokens += r.usage.completion_tokens
    demo_deployment.requests += 1


def test_the_configs_grpc_proxy_serves_our_services(demo_deployment):
    with grpc.insecure_channel(f"127.0.0.1:{demo_deployment.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "moe_serve.v1.MoeServe"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=60).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_engine_deployment_runs_with_the_configs_autoscaling(demo_deployment):
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details["applications"]["moe-serve"]
    wanted = demo_deployment.config["applications"][0]["args"]["autoscaling"]
    deployed = app["deployments"]["EngineDeployment"]["deployment_config"]["autoscaling_config"]
    assert {k: deployed[k] for k in wanted} == wanted
    assert app["deployed_app_config"]["import_path"] == "gateway.serve_config:app_builder"


def locust_read_stream():
    """`read_stream` from the locustfile, without importing Locust (not a test dependency)."""
    path = DEPLOY / "locust" / "locustfile.py"
    tree = ast.parse(path.read_text())
    keep = [n for n in tree.body
            if isinstance(n, ast.Import | ast.ImportFrom) and getattr(n, "module", None) != "locust"]
    keep += [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "read_stream"]
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["read_stream"]


def test_locust_stream_reader_on_a_real_stream(demo_deployment):
    read_stream = locust_read_stream()
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.0}
    stamps: list[float] = []
    seen: list[str] = []

    def tee(lines):
        for line in lines:
            seen.append(line)
            yield line

    url = f"{demo_deployment.base_url}/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        assert response.status_code == 200
        assert read_stream(tee(response.iter_lines()), stamps) is None
    chunks = [json.loads(line.removeprefix("data: ")) for line in seen if line.startswith("data: {")]
    (usage,) = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    assert 1 <= len(stamps) <= usage["completion_tokens"] <= 5  # a stamp per chunk with text
    demo_deployment.completion_tokens += usage["completion_tokens"]
    demo_deployment.requests += 1
    error_event = ['data: {"error": {"message": "boom"}}', "data: [DONE]"]
    assert read_stream(iter(error_event), []) == "stream error: boom"
    assert read_stream(iter(['data: {"choices": []}']), []) == "stream ended without [DONE]"
