"""Prometheus metrics through Ray's pipeline: scraped from the node's export port.

Every family in gateway/metric_catalog.py must be exported and move with traffic, and
the generated-token counter must equal the completion tokens the clients were told.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metric_catalog import CATALOG
from tests.e2e.conftest import free_port, run_app


@pytest.fixture(scope="module")
def metrics_server(demo_model_dir):
    import ray
    from ray import serve

    from gateway.app import ServeOptions

    metrics_port = free_port()
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = ServeOptions(model_dir=str(demo_model_dir), model_name="demo-metrics", num_attention_workers=1,
                           num_expert_workers=2, num_cpus_per_worker=0.25, max_num_seqs=16, num_kv_blocks=256)
    server = run_app(f"http://127.0.0.1:{port}", options, "metrics", "/")
    yield server, f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()


# Families that only appear once their event happened (no preemption, worker fault or change of the
# expert plane here).
EVENT_COUNTERS = {spec.name for spec in CATALOG if spec.on_event}


def scrape(url: str) -> dict[str, list]:
    """family name → samples, only our model's."""
    text = httpx.get(url, timeout=30).text
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("ray_moe_serve_"):
            out.setdefault(fam.name, []).extend(
                s for s in fam.samples if s.labels.get("model") == "demo-metrics")
    return out


def counter_value(samples: dict[str, list], exported: str) -> float:
    family = exported.removesuffix("_total")
    return sum(s.value for s in samples.get(family, []) if s.name == exported)


def wait_for(url: str, predicate, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if predicate(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1.0)


def test_every_documented_family_is_exported_and_moves(metrics_server):
    server, url = metrics_server
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    told = 0
    for i in range(6):
        r = client.completions.create(model=server.model_name, prompt=f"Hello number {i}", max_tokens=5 + i,
                                      temperature=0.0)
        told += r.usage.completion_tokens
    with client.chat.completions.create(model=server.model_name, stream=True, max_tokens=7,
                                        messages=[{"role": "user", "content": "hi"}],
                                        stream_options={"include_usage": True}) as stream:
        for chunk in stream:
            if chunk.usage:
                told += chunk.usage.completion_tokens

    gen = "ray_moe_serve_generation_tokens_total"
    samples = wait_for(url, lambda s: counter_value(s, gen) >= told and "ray_moe_serve_expert_tokens" in s)
    assert counter_value(samples, gen) == told
    # Pipeline families: counters are exported as <family> with <family>_total samples.
    for spec in CATALOG:
        family = f"ray_{spec.name}"
        if spec.name in EVENT_COUNTERS:
            continue  # no preemption or fault happened: Ray exports a counter from its first increment
        assert family in samples, f"{family} missing from the scrape"
    assert counter_value(samples, "ray_moe_serve_requests_total") == 7
    # Every expert of every layer saw tokens; top-2 means rows = 2 × computed tokens per layer.
    expert_rows = [s for s in samples["ray_moe_serve_expert_tokens"] if s.name.endswith("_total")]
    layers = {s.labels["layer"] for s in expert_rows}
    assert len(layers) == 4
    per_layer = {layer: sum(s.value for s in expert_rows if s.labels["layer"] == layer) for layer in layers}
    assert len(set(per_layer.values())) == 1 and next(iter(per_layer.values())) % 2 == 0
    ttft = [s for s in samples["ray_moe_serve_time_to_first_token_seconds"]
            if s.name.endswith("_count")]
    assert sum(s.value for s in ttft) == 7
    imbalance = [s.value for s in samples["ray_moe_serve_expert_load_imbalance"]]
    assert imbalance and all(v >= 1.0 for v in imbalance)
