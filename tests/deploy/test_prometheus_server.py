"""A real Prometheus server (Debian's `prometheus`, `make prometheus` installs it) scrapes the demo
config's cluster with the job of deploy/prometheus/prometheus.yml, and its HTTP API returns our
metrics with the values the clients saw; every dashboard query evaluates there. `promtool`
checks the repository's config file.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from gateway.metric_catalog import CATALOG
from tests.deploy.manifests import DEPLOY, dashboard_exprs, load_dashboard, promql_metric_names
from tests.e2e.conftest import free_port

CONFIG = DEPLOY / "prometheus" / "prometheus.yml"


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed: `make prometheus` installs Debian's package (as root)")
    return path


def test_promtool_accepts_the_repository_config():
    result = subprocess.run([require("promtool"), "check", "config", str(CONFIG)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def local_config(metrics_port: int) -> dict:
    """The repository's job, scraping this test's Ray node (not Ray's discovery file) every second."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    job.pop("file_sd_configs")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    return config


@pytest.fixture(scope="module")
def prometheus(request, tmp_path_factory):
    """The server's API base URL; the process is ended at teardown."""
    binary = require("prometheus")  # before the cluster starts: a skip should cost nothing
    demo_deployment = request.getfixturevalue("demo_deployment")
    work = tmp_path_factory.mktemp("prometheus")
    config_file = work / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(local_config(demo_deployment.metrics_port)))
    address = f"127.0.0.1:{free_port()}"
    log = (work / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={config_file}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address={address}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://{address}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(base):
            assert process.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log.close()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/-/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def query(base: str, expr: str) -> list[dict]:
    body = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def scalar(base: str, expr: str) -> float | None:
    result = query(base, expr)
    return float(result[0]["value"][1]) if result else None


def wait_for_value(base: str, expr: str, expected: float, timeout_s: float = 60.0) -> float | None:
    deadline = time.monotonic() + timeout_s
    while True:
        value = scalar(base, expr)
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(1.0)


def test_prometheus_scrapes_our_metrics_with_the_values_clients_saw(demo_deployment, prometheus):
    demo_deployment.generate()
    model = f'model="{demo_deployment.model_name}"'
    assert wait_for_value(prometheus, 'up{job="moe-serve"}', 1.0) == 1.0  # discovered and scraped
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=30).json()["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["scrapeUrl"], t["health"]) for t in targets] == [
        ("moe-serve", f"http://127.0.0.1:{demo_deployment.metrics_port}/metrics", "up")]

    told = demo_deployment.completion_tokens
    assert wait_for_value(prometheus, f"sum(ray_moe_serve_generation_tokens_total{{{model}}})", told) == told
    requests = demo_deployment.requests
    assert wait_for_value(prometheus, f"sum(ray_moe_serve_requests_total{{{model}}})", requests) == requests
    ttft_count = f"sum(ray_moe_serve_time_to_first_token_seconds_count{{{model}}})"
    assert wait_for_value(prometheus, ttft_count, requests) == requests
    # Every request has an end-to-end latency, and the quantile lies inside the histogram's range.
    p50 = scalar(prometheus, "histogram_quantile(0.5, sum by (le) "
                             f"(ray_moe_serve_e2e_request_latency_seconds_bucket{{{model}}}))")
    assert p50 is not None and 0 < p50 <= 60
    total_blocks = scalar(prometheus, f"sum(ray_moe_serve_kv_blocks_total{{{model}}})")
    args = demo_deployment.config["applications"][0]["args"]
    assert total_blocks == args["num_kv_blocks"]  # one model group, one attention worker
    usage = scalar(prometheus, f"sum(ray_moe_serve_kv_blocks_used{{{model}}}) / "
                               f"sum(ray_moe_serve_kv_blocks_total{{{model}}})")
    assert usage is not None and 0 <= usage <= 1
    # top-2 routing: every layer saw twice as many rows as tokens it computed, spread over its 8 experts.
    # (The workers' counts are drained once a second: poll until a scrape has all layers' rows.)
    deadline = time.monotonic() + 30
    while True:
        per_layer = query(prometheus, f"sum by (layer) (ray_moe_serve_expert_tokens_total{{{model}}})")
        if len({r["value"][1] for r in per_layer}) == 1 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert len(per_layer) == 4 and len({r["value"][1] for r in per_layer}) == 1
    assert len(query(prometheus, f"ray_moe_serve_expert_tokens_total{{{model}}}")) == 4 * 8


def test_every_dashboard_query_evaluates_on_prometheus(demo_deployment, prometheus):
    demo_deployment.generate(prompts=2)
    time.sleep(3)  # a few scrapes after the traffic, so rate() has two points
    empty = []
    for expr in dashboard_exprs(load_dashboard()):
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        promql = expr.replace("$__rate_interval", "1m").replace("$model", demo_deployment.model_name)
        if not query(prometheus, promql):
            empty.append(promql)
    # Only panels of families recorded on an event may be empty: no preemption, fault or change of the
    # expert plane happened.
    on_event = {name for spec in CATALOG if spec.on_event for name in spec.sample_names}
    assert all(promql_metric_names(e) & on_event for e in empty), empty
