"""`moe-serve serve` as the README's quick start runs it, as a subprocess (the venv's command, the
whole model in one process, free ports): the banner, the metrics port it names, the banner's curl
run by a shell as printed, the README's openai snippet, gRPC on loopback only, the 404 and
Content-Type messages through Serve's proxy, `/ready` saying "draining" during Ctrl-C's drain while
a stream finishes, and a quiet end."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway.listening_sockets import listening_addresses
from tests.unit.test_readme import README, code_blocks, section, sh_commands

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-quick-start"
READY_LINE = "Ctrl-C stops."
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 120.0
SCARY = ("graceful_shutdown failed", "killed by `ray.kill`", "Traceback")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def readme_serve_command() -> list[str]:
    """The quick start's `.venv/bin/moe-serve serve ...` line, split as the shell would."""
    (line,) = [c for c in sh_commands(section(README.read_text(), "Quick start"))
               if c.startswith(".venv/bin/moe-serve serve ") and "--help" not in c]
    return line.split()


class Server:
    def __init__(self, demo_dir: Path, log: Path) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log = log
        self.env = dict(os.environ, MOE_SERVE_API_KEY=KEY, MOE_SERVE_DEMO_DIR=str(demo_dir),
                        RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        argv = readme_serve_command() + ["--port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                                         "--metrics-port", str(self.metrics_port)]
        # A session of its own: Ctrl-C is SIGINT to the whole process group, as a terminal sends it.
        self.proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while READY_LINE not in self.text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()[-5000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{self.text()[-5000:]}"
            time.sleep(1)
        lines = self.text().splitlines()
        start = max(i for i, line in enumerate(lines) if line.startswith("moe-serve: serving"))
        end = next(i for i, line in enumerate(lines) if line == READY_LINE and i > start)
        return "\n".join(lines[start:end + 1])

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture
def server(demo_model_dir, tmp_path):
    srv = Server(demo_model_dir, tmp_path / "serve.log")
    try:
        yield srv
    finally:
        srv.kill()


def banner_curl(banner: str) -> str:
    lines = banner.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
    return lines[i].strip() + "\n" + lines[i + 1]


def stream_tokens(url: str, model: str, out: dict) -> None:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True,
            "stream": True}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        out["status"] = resp.status_code
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                out["started"].set()
    out["events"] = events


def test_serve_as_the_quick_start_runs_it(server, tmp_path):
    banner = server.wait_ready()
    url = f"http://127.0.0.1:{server.http_port}"
    model = re.search(r"serving '([^']+)'", banner).group(1)

    # The banner: layout, where the metrics are, the key the way it was given ($MOE_SERVE_API_KEY).
    assert "the whole model in one engine replica" in banner and "dtype" in banner
    # What the replica resolved at start: "auto" became the CPU and float32, and its KV cache size.
    assert re.search(r"  memory      engine replica: cpu float32: weights [\d.]+ GiB, KV cache \d+ blocks",
                     banner)
    assert f"  metrics     http://127.0.0.1:{server.metrics_port}/metrics" in banner.splitlines()
    assert "$MOE_SERVE_API_KEY" in banner and KEY not in banner
    assert "random weights" in banner

    # gRPC listens on loopback only, like HTTP.
    assert [str(a) for a in listening_addresses(server.grpc_port)] == ["127.0.0.1"]

    # The banner's curl, as printed, by a shell that has the key in its environment.
    res = subprocess.run(["bash", "-c", banner_curl(banner) + " --silent --show-error"], env=server.env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and '"choices"' in res.stdout, (res.stdout, res.stderr)

    # The README's openai snippet, with this server's port and key.
    (snippet,) = code_blocks(section(README.read_text(), "Quick start"), "python")
    snippet = textwrap.dedent(snippet).replace("8000", str(server.http_port))
    snippet = snippet.replace('api_key="none"', f'api_key="{KEY}"')
    snippet = snippet.replace('model="demo-model"', f'model="{model}"')
    res = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr[-3000:]

    auth = {"Authorization": f"Bearer {KEY}"}
    # An unknown model's 404 names the served one; a form-encoded body is told about Content-Type.
    resp = httpx.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": "x"}, headers=auth,
                      timeout=60)
    assert resp.status_code == 404 and f"`{model}`" in resp.json()["error"]["message"]
    resp = httpx.post(f"{url}/v1/completions", content=b'{"model": "x", "prompt": "x"}', timeout=60,
                      headers={**auth, "Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 400 and "Content-Type: application/json" in resp.json()["error"]["message"]

    # The metrics port serves Prometheus text, our families included once a request has finished.
    deadline = time.monotonic() + 90
    while "ray_moe_serve_generation_tokens_total" not in (text := httpx.get(
            f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30).text):
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(2)

    # Ctrl-C while a stream runs: /ready says draining, the stream finishes, the end is quiet.
    streamed: dict = {"started": threading.Event()}
    client = threading.Thread(target=stream_tokens, args=(url, model, streamed))
    client.start()
    assert streamed["started"].wait(60)
    server.ctrl_c()
    deadline = time.monotonic() + 30
    while (ready := httpx.get(f"{url}/ready", timeout=30)).status_code == 200:
        assert time.monotonic() < deadline, "/ready stayed 200 during the drain"
        time.sleep(0.1)
    assert ready.status_code == 503 and "draining" in ready.json()["error"]["message"], ready.text
    client.join(120)
    assert streamed["status"] == 200 and streamed["events"][-1] == "[DONE]"
    assert '"finish_reason": "length"' in streamed["events"][-2].replace('":"', '": "')
    server.proc.wait(STOP_TIMEOUT_S)
    log = server.text()
    assert server.proc.returncode == 0, log[-5000:]
    assert [line for line in log.splitlines() if line.strip()][-1] == "moe-serve: stopped", log[-3000:]
    assert not [s for s in SCARY if s in log], log[-5000:]
