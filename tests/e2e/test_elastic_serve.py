"""`moe-serve serve --router-skew 2 --rebalance --expert-autoscaling`: the operator's way to the
elastic expert plane.

The skewed demo checkpoint sends most tokens to a few experts; with live rebalancing on, the
replica's expert plane reads the load and moves experts (with replicas of the hottest), and with
expert autoscaling on (any busy time is enough here) it adds a third expert worker, in a
placement group of its own, all while the `openai` client's requests stream; the metrics say
so. Greedy answers are the same before, during and after.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import free_port
from tests.serve_process import ServeProcess

START_TIMEOUT_S = 300.0
MOVE_TIMEOUT_S = 120.0
PROMPTS = [f"The river number {i} runs" for i in range(12)]


@pytest.fixture(scope="module")
def skewed_server(tmp_path_factory):
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    demo = tmp_path_factory.mktemp("demo-cache") / "demo-model"
    env = {**os.environ, "MOE_SERVE_DEMO_DIR": str(demo)}
    server = ServeProcess(
        ["--router-skew", "2", "--model-name", "skewed", "--expert-workers", "2", "--cpus-per-worker", "0.1",
         "--num-kv-blocks", "256", "--port", str(port), "--grpc-port", str(grpc_port), "--metrics-port",
         str(metrics_port), "--graceful-shutdown-timeout-s", "5",
         "--rebalance", "--rebalance-threshold", "1.05", "--rebalance-interval", "1",
         "--rebalance-window", "20", "--expert-replicas-per-layer", "1",
         "--expert-autoscaling", "--max-expert-workers", "3", "--expert-upscale-busy", "0.001",
         "--expert-upscale-delay", "0", "--expert-downscale-busy", "0.0005",
         "--expert-downscale-delay", "3600"],
        tmp_path_factory.mktemp("serve-log") / "serve.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready(url, START_TIMEOUT_S)
        yield server, url, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        server.stop()


def answers(client: openai.OpenAI) -> list[str]:
    def one(prompt: str) -> str:
        r = client.completions.create(model="skewed", prompt=prompt, max_tokens=24, temperature=0.0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
        return r.choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def plane_samples(url: str) -> dict[str, float]:
    """`name{labels}` → value for the expert plane's families (any model)."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        if any(part in fam.name for part in ("expert_plane", "placement_version", "expert_worker_tokens",
                                             "num_expert_workers")):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                                  if k in ("kind", "outcome", "rank"))
                out[f"{s.name}{{{labels}}}"] = out.get(f"{s.name}{{{labels}}}", 0.0) + s.value
    return out


def done(samples: dict[str, float], kind: str) -> float:
    return samples.get(f"ray_moe_serve_expert_plane_events_total{{kind={kind},outcome=done}}", 0)


def test_skewed_load_is_rebalanced_and_scaled_while_serving_and_answers_stay_the_same(skewed_server):
    server, url, metrics_url = skewed_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    before = answers(client)
    deadline = time.monotonic() + MOVE_TIMEOUT_S
    moved = {}
    while time.monotonic() < deadline:  # keep the load coming until the plane has moved experts
        assert answers(client) == before
        moved = plane_samples(metrics_url)
        if done(moved, "rebalance") >= 1 and done(moved, "scale_up") >= 1:
            break
    assert done(moved, "rebalance") >= 1 and done(moved, "scale_up") == 1, \
        f"no rebalance and scale-up within {MOVE_TIMEOUT_S:g}s: {moved}\n{server.tail()}"
    assert moved.get("ray_moe_serve_num_expert_workers{}") == 3  # max_workers reached, not passed
    assert moved.get("ray_moe_serve_expert_placement_version{}", 0) >= 2
    assert sum(v for k, v in moved.items() if k.startswith("ray_moe_serve_expert_worker_tokens_total")) > 0
    assert answers(client) == before  # on the new placement, with replicas
    assert "expert plane rebalance on" in server.log.read_text()  # the banner named the plane's settings
