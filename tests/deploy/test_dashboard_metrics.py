"""The Grafana dashboard reads only metrics the server really exports: every metric name in its
PromQL is in a live scrape of the demo config's cluster (1 attention + 2 expert workers, so the
per-(layer, expert) families are there), after traffic.

Families recorded only when their event happens (the catalog's `on_event`: preemptions, faults,
changes of the expert plane) are exported from their first record, and this traffic neither runs
out of KV blocks, kills a worker nor changes the expert plane; for those the check is that the name
is exactly one the catalog exports, and that they are the only names missing.
"""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.metric_catalog import CATALOG
from tests.deploy.manifests import dashboard_exprs, load_dashboard, promql_metric_names

EVENT_SAMPLES = {name for spec in CATALOG if spec.on_event for name in spec.sample_names}


def exported_samples(url: str, model: str) -> dict[str, set[str]]:
    """Sample name → its label names, for our model in one scrape (counters as *_total, ...)."""
    text = httpx.get(url, timeout=30).text
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model") == model:
                out.setdefault(s.name, set()).update(s.labels)
    return out


def catalog_sample_names() -> set[str]:
    return {name for spec in CATALOG for name in spec.sample_names}


def test_every_dashboard_metric_is_in_a_live_scrape(demo_deployment):
    referenced = set().union(*(promql_metric_names(e) for e in dashboard_exprs(load_dashboard())))
    demo_deployment.generate()
    deadline = time.monotonic() + 90
    while True:  # data-plane families are drained from the workers about once a second
        exported = exported_samples(demo_deployment.metrics_url, demo_deployment.model_name)
        if referenced - EVENT_SAMPLES <= exported.keys() or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    missing = referenced - exported.keys()
    assert missing <= EVENT_SAMPLES, f"not exported: {sorted(missing)}"
    assert referenced <= catalog_sample_names()
    # The heatmap groups by layer and expert, the dispatch/combine panels by rank.
    assert {"layer", "expert"} <= exported["ray_moe_serve_expert_tokens_total"]
    assert "rank" in exported["ray_moe_serve_dispatch_seconds_total"]
