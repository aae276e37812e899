"""gRPC is reachable only where `moe-serve serve --host` says (issue: Serve's proxy binds [::]).

Two network namespaces of the test's own making on a private bridge (tests/integration/netns.py):
the server in h0 (198.18.0.1), a client in h1 (198.18.0.2). With `--host 127.0.0.1` a client in
h1 is refused on 198.18.0.1:9000 (and :8000), while inside h0 the server answers on loopback; with
`--host 0.0.0.0` the client in h1 gets answers over the bridge. The test sends traffic only to
198.18.0.0/24 and to loopback inside its namespaces.

Root only (skipped otherwise). Every process started here is ended by process id, never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.netns import NetnsUnavailable, virtual_hosts

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
MOE_SERVE = str(Path(sys.executable).with_name("moe-serve"))  # the venv's, as the README runs it
READY_LINE = "Ctrl-C stops."
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 120.0
GRPC_PORT, HTTP_PORT = 9000, 8000  # each namespace has its own ports: the defaults are free there

# Run inside a namespace: TCP connect, gRPC health and one generation against argv[1]:PORT.
CLIENT = """
import socket, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from gateway.grpc_stubs import moe_serve_pb2 as pb, moe_serve_pb2_grpc as pb_grpc
host, grpc_port, http_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for port in (grpc_port, http_port):
    try:
        socket.create_connection((host, port), timeout=10).close()
        print(f"tcp {port} connected")
    except ConnectionRefusedError:
        print(f"tcp {port} refused")
    except OSError as exc:
        print(f"tcp {port} {type(exc).__name__}")
with grpc.insecure_channel(f"{host}:{grpc_port}") as channel:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        print("health", health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                     sampling=pb.SamplingParams(max_tokens=4, temperature=0))
        print("generated", len(pb_grpc.MoeServeStub(channel).Generate(request, timeout=60).token_ids))
    except grpc.RpcError as exc:
        print("grpc", exc.code().name)
"""


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_worker_prestart": "0",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    for name in ("RAY_ADDRESS", "MOE_SERVE_API_KEY"):
        out.pop(name, None)
    return out


@pytest.fixture
def hosts():
    try:
        with virtual_hosts(2, prefix="mgb") as hs:
            yield hs
    except NetnsUnavailable as e:
        pytest.skip(f"cannot make network namespaces here: {e}")


def start_server(host_ns, bind: str, model_dir: Path, log: Path) -> subprocess.Popen:
    argv = [MOE_SERVE, "serve", "--host", bind, "--model", str(model_dir), "--model-name", "demo",
            "--expert-workers", "0", "--cpus-per-worker", "0.25"]
    proc = host_ns.popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env(), cwd=REPO)
    deadline = time.monotonic() + START_TIMEOUT_S
    while READY_LINE not in log.read_text():
        tail = log.read_text()[-5000:]
        assert proc.poll() is None, f"moe-serve serve exited ({proc.returncode}):\n{tail}"
        assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT_S:.0f} s:\n{tail}"
        time.sleep(1)
    return proc


def stop_server(proc: subprocess.Popen, log: Path) -> None:
    """Ctrl-C, as a terminal sends it: SIGINT to the server's process group."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"did not stop after Ctrl-C:\n{log.read_text()[-5000:]}") from None
    assert proc.returncode == 0, log.read_text()[-5000:]


def client(host_ns, target: str) -> list[str]:
    res = host_ns.run([sys.executable, "-c", CLIENT, target, str(GRPC_PORT), str(HTTP_PORT)], timeout=180,
                      env=env(), cwd=REPO, check=False)
    assert res.returncode == 0, res.stderr[-5000:]
    return res.stdout.splitlines()


def listening(host_ns, port: int) -> set[str]:
    """Local addresses listening on `port` inside the namespace, as `ss` (iproute2) prints them."""
    res = host_ns.run(["ss", "-ltnH", f"sport = :{port}"], timeout=10)
    return {line.split()[3].rsplit(":", 1)[0] for line in res.stdout.splitlines() if line.strip()}


def test_grpc_listens_only_where_host_says(hosts, demo_model_dir, tmp_path):
    server, other = hosts

    proc = start_server(server, "127.0.0.1", demo_model_dir, tmp_path / "loopback.log")
    try:
        bound = listening(server, GRPC_PORT)
        assert bound and bound <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, bound
        from_inside = client(server, "127.0.0.1")
        from_outside = client(other, server.address)
    finally:
        stop_server(proc, tmp_path / "loopback.log")
    assert "health SERVING" in from_inside and "generated 4" in from_inside, from_inside
    assert f"tcp {GRPC_PORT} refused" in from_outside, from_outside
    assert f"tcp {HTTP_PORT} refused" in from_outside, from_outside
    assert "grpc UNAVAILABLE" in from_outside, from_outside

    proc = start_server(server, "0.0.0.0", demo_model_dir, tmp_path / "everywhere.log")
    try:
        from_outside = client(other, server.address)
    finally:
        stop_server(proc, tmp_path / "everywhere.log")
    assert f"tcp {GRPC_PORT} connected" in from_outside and f"tcp {HTTP_PORT} connected" in from_outside
    assert "health SERVING" in from_outside and "generated 4" in from_outside, from_outside
