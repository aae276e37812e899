"""`moe-serve bench` (the real CLI, as a subprocess) against a running server, over HTTP and gRPC.

The token counts it reports must equal what the server's own Prometheus counters moved by
(warm-up requests included, which the result file reports apart), and its JSON and PNG must be
written. The server is the single-process engine (cheapest) with an API key, behind Serve's HTTP
and gRPC proxies, with Ray's metrics export on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import free_port, run_app

MODEL = "demo-bench"
KEY = "sk-bench-test"
MOE_SERVE = str(Path(sys.executable).with_name("moe-serve"))
PROMPT_TOKENS = "ray_moe_serve_prompt_tokens_total"
GENERATION_TOKENS = "ray_moe_serve_generation_tokens_total"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench_server(demo_model_dir):
    import ray
    from ray import serve

    from gateway.app import ServeOptions
    from gateway.grpc_stubs import servicer_functions

    metrics_port, grpc_port = free_port(), free_port()
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": servicer_functions()})
    options = ServeOptions(model_dir=str(demo_model_dir), model_name=MODEL, num_expert_workers=0,
                           num_cpus_per_worker=0.25, max_num_seqs=16, num_kv_blocks=256, api_key=KEY)
    server = run_app(f"http://127.0.0.1:{port}", options, "bench", "/")
    yield server, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()


def counters(url: str) -> dict[str, float]:
    """Our model's prompt and generation token counters (0 before their first increment)."""
    out = {PROMPT_TOKENS: 0.0, GENERATION_TOKENS: 0.0}
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for s in family.samples:
            if s.name in out and s.labels.get("model") == MODEL:
                out[s.name] += s.value
    return out


def wait_for_counters(url: str, expected: dict[str, float], timeout_s: float = 60.0) -> dict[str, float]:
    """Ray exports every second or so: poll until the counters reach `expected` (or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = counters(url)
        if all(now[k] >= v for k, v in expected.items()) or time.monotonic() > deadline:
            return now
        time.sleep(1.0)


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MOE_SERVE, "bench", "--disable-tqdm", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def check_png(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 400 and height > 200


def token_totals(result: dict) -> tuple[int, int]:
    """Prompt and generated tokens the bench saw over all runs, warm-ups included."""
    runs = result["runs"]
    return (sum(r["total_input_tokens"] + r["warmup_input_tokens"] for r in runs),
            sum(r["total_output_tokens"] + r["warmup_output_tokens"] for r in runs))


def run_and_compare(metrics_url: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    before = counters(metrics_url)
    out = bench(*args, "--result-file", str(tmp_path / "result.json"), "--plot", str(tmp_path / "plot.png"),
                env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    prompt, generated = token_totals(result)
    after = wait_for_counters(metrics_url, {PROMPT_TOKENS: before[PROMPT_TOKENS] + prompt,
                                            GENERATION_TOKENS: before[GENERATION_TOKENS] + generated})
    assert after[PROMPT_TOKENS] - before[PROMPT_TOKENS] == prompt
    assert after[GENERATION_TOKENS] - before[GENERATION_TOKENS] == generated
    check_png(tmp_path / "plot.png")
    return {"result": result, "stdout": out.stdout}


def test_http_bench_tokens_match_the_servers_counters(bench_server, tmp_path):
    server, _, metrics_url = bench_server
    got = run_and_compare(metrics_url, tmp_path, "--base-url", server.url, "--num-prompts", "20",
                          "--random-input-len", "24", "--random-output-len", "12", "--max-concurrency", "4",
                          "--num-warmups", "2", "--goodput", "ttft:60000", "e2el:120000",
                          env={"OPENAI_API_KEY": KEY})
    [run] = got["result"]["runs"]
    assert (run["completed"], run["failed"]) == (20, 0)
    # Exact: token ids are used as given, and ignore_eos generates every token asked for.
    assert run["input_lens"] == [24] * 20 and run["output_lens"] == [12] * 20
    assert (run["total_input_tokens"], run["total_output_tokens"]) == (480, 240)
    assert (run["num_warmups"], run["warmup_input_tokens"], run["warmup_output_tokens"]) == (2, 48, 24)
    assert 1 <= run["max_concurrent_requests"] <= 4
    assert run["request_goodput"] == pytest.approx(run["request_throughput"])  # SLOs nobody misses
    # A chunk per engine step, or fewer when the server merged steps the client had not read yet.
    assert all(len(itl) <= 11 for itl in run["itls"]) and sum(map(len, run["itls"])) > 0
    assert 0 < run["median_ttft_ms"] <= run["p99_ttft_ms"] <= run["p99_e2el_ms"]
    assert "api_key" not in got["result"]["config"]["target"]  # the key never reaches the disk
    assert "Serving Benchmark Result" in got["stdout"] and "Request goodput (req/s):" in got["stdout"]


def test_grpc_sweep_tokens_match_the_servers_counters(bench_server, tmp_path):
    _, grpc_address, metrics_url = bench_server
    got = run_and_compare(metrics_url, tmp_path, "--backend", "grpc", "--grpc-address", grpc_address,
                          "--api-key", KEY, "--model", MODEL, "--sweep-rates", "4,inf",
                          "--max-concurrency", "8", "--num-prompts", "10", "--random-input-len", "16",
                          "--random-output-len", "8", "--random-range-ratio", "0.5")
    runs = got["result"]["runs"]
    assert [r["request_rate"] for r in runs] == [4.0, "inf"]
    for run in runs:
        assert (run["completed"], run["failed"]) == (10, 0)
        assert all(8 <= n <= 24 for n in run["input_lens"]) and all(4 <= n <= 12 for n in run["output_lens"])
        assert sum(run["output_lens"]) == run["total_output_tokens"]
    assert got["stdout"].count("Serving Benchmark Result @") == 2


def test_a_wrong_key_is_reported_as_failed_requests(bench_server):
    server, _, _ = bench_server
    out = bench("--base-url", server.url, "--model", MODEL, "--api-key", "sk-wrong", "--num-prompts", "3",
                "--random-input-len", "4", "--random-output-len", "2")
    assert out.returncode == 1  # nothing completed
    assert "Failed requests:                        3" in out.stdout
    assert "HTTP 401" in out.stdout and "Traceback" not in out.stderr
