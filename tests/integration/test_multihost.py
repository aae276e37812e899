"""A model group across three "hosts": the process-group rendezvous uses real node addresses.

Three network namespaces on a private bridge stand in for three machines (198.18.0.1-3):
the Ray head (with the `moe_attention` resource) in h0, one `moe_expert` node in each of h1
and h2. A driver inside h0 builds the distributed engine (1 attention + 2 expert workers,
SPREAD) and runs greedy requests. Each namespace has its own loopback, so an address that
is a loopback constant, or a socket bound to loopback, cannot reach a peer in another
namespace: the collectives only work if every rank is reached at its node's real address.

Root only (skipped otherwise). Nothing is added to the machine's own network namespace,
and every process started here is ended by process id, never by name.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from cluster.local_engine import build_local_engine
from tests.engine_helpers import run_requests
from tests.integration import multihost_driver as driver
from tests.integration.netns import NetnsUnavailable, virtual_hosts
from tests.model_helpers import save_hf_mixtral

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray, beside its python
GCS_PORT = 6379  # each namespace has its own ports: no clash with any other Ray on the machine
START_TIMEOUT_S = 60.0
DRIVER_TIMEOUT_S = 150.0


AUTH_TOKEN = secrets.token_hex(32)  # this cluster's own: never the machine's ~/.ray/auth_token


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RAY_USAGE_STATS_ENABLED": "0",
        # Token auth, as `ray start --head` turns on by default, with a token every node and the
        # driver get from here; left to Ray, the head would pick up ~/.ray/auth_token if some
        # other cluster on the machine wrote one, and worker nodes would not.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": AUTH_TOKEN,
        # Two cores for three nodes: no idle workers started ahead of time.
        "RAY_enable_worker_prestart": "0",
        "RAY_prestart_worker_first_driver": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    })
    # From the outer environment, these would point elsewhere or hide what is tested.
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "GLOO_SOCKET_IFNAME"):
        env.pop(name, None)
    return env


def start_node(host, head_address: str | None, resources: dict, num_cpus: int, temp_dir: Path,
               log: Path) -> None:
    argv = [RAY, "start", "--node-ip-address", host.address, "--num-cpus", str(num_cpus),
            "--resources", json.dumps(resources), "--object-store-memory", str(100 * 1024 ** 2),
            "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if head_address is None:
        argv += ["--head", "--port", str(GCS_PORT), "--include-dashboard=false"]
    else:
        argv += ["--address", head_address]
    try:
        res = host.run(argv, timeout=START_TIMEOUT_S, env=ray_env(), check=False)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"`ray start` in {host.name} took over {START_TIMEOUT_S:.0f}s") from e
    log.write_text(res.stdout + res.stderr)
    assert res.returncode == 0, f"`ray start` in {host.name} failed:\n{res.stdout}\n{res.stderr}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # On the shared filesystem: the test, the driver and every Ray worker read the same files.
    out = tmp_path_factory.mktemp("multihost_model")
    save_hf_mixtral(out, num_hidden_layers=2, num_local_experts=8, max_position_embeddings=512)
    return out


@pytest.fixture(scope="module")
def hosts():
    try:
        with virtual_hosts(3) as hs:
            yield hs
    except NetnsUnavailable as e:
        pytest.skip(f"cannot make network namespaces here: {e}")


def test_rendezvous_uses_node_addresses_across_hosts(hosts, model_dir, tmp_path):
    t0 = time.monotonic()
    h0, h1, h2 = hosts
    head = f"{h0.address}:{GCS_PORT}"
    # Short paths: Ray's unix sockets live under the temp dir (108-byte limit on their paths).
    # One temp dir per node, as on real machines.
    tmp = Path(tempfile.mkdtemp(prefix="moe-mh-"))
    try:
        start_node(h0, None, {"moe_attention": 4}, 2, tmp / "h0", tmp_path / "h0.log")
        start_node(h1, head, {"moe_expert": 4}, 1, tmp / "h1", tmp_path / "h1.log")
        start_node(h2, head, {"moe_expert": 4}, 1, tmp / "h2", tmp_path / "h2.log")
        t_cluster = time.monotonic() - t0

        argv = [sys.executable, "-m", "tests.integration.multihost_driver", "--address", head,
                "--model-dir", str(model_dir), "--nodes", "3", "--timeout", "90"]
        try:
            res = h0.run(argv, timeout=DRIVER_TIMEOUT_S, env=ray_env(), cwd=REPO, check=False)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"driver did not finish within {DRIVER_TIMEOUT_S:.0f}s:\n"
                                 f"{e.stdout}\n{e.stderr}") from e
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith(driver.RESULT_PREFIX)]
        assert res.returncode == 0 and lines, (
            f"driver failed (rc={res.returncode}):\n{res.stdout[-5000:]}\n{res.stderr[-10000:]}")
        got = json.loads(lines[-1][len(driver.RESULT_PREFIX):])
    finally:
        for h in hosts:  # the module fixture tears the namespaces down; stop Ray now regardless
            h.kill_all()
        subprocess.run(["rm", "-rf", str(tmp)], timeout=30, check=False)
    t_driver = time.monotonic() - t0

    # The cluster really is three nodes at three addresses.
    by_address = {nd["address"]: nd for nd in got["nodes"]}
    assert sorted(by_address) == ["198.18.0.1", "198.18.0.2", "198.18.0.3"], got["nodes"]

    # Rank 0 (the attention worker, on the head) published its node's address, not loopback.
    addr, port = got["rendezvous"]
    assert addr == h0.address, f"rendezvous at {addr}:{port}, expected {h0.address}"
    assert not addr.startswith("127."), addr
    assert 0 < port < 65536

    # Ranks in order: attention on h0, the two experts SPREAD over h1 and h2 (one each).
    where = sorted(got["where"], key=lambda w: w["rank"])
    assert [w["rank"] for w in where] == [0, 1, 2]
    assert where[0]["address"] == "198.18.0.1"
    assert sorted(w["address"] for w in where[1:]) == ["198.18.0.2", "198.18.0.3"]
    for w in where:  # where() says which Ray node; that node is at the address the worker reports
        assert by_address[w["address"]]["node_id"] == w["node_id"], (w, got["nodes"])

    # The expert ranks really took part: rows came to each over the wire, results went back.
    for rank in (1, 2):
        st = got["dispatch_stats"][rank]
        assert st["rows_received"] > 0 and st["dispatch_bytes_received"] > 0, (rank, st)
        assert st["combine_bytes_sent"] > 0, (rank, st)

    # Across the three hosts, the engine computes exactly what the single-process engine does.
    want = run_requests(build_local_engine(model_dir, driver.engine_cfg()), driver.requests())
    assert len(got["outputs"]) == len(want)
    for i, (w, g) in enumerate(zip(want, got["outputs"], strict=True)):
        assert g["token_ids"] == w["token_ids"], f"request {i}"
        torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]),
                                   rtol=0, atol=1e-4)
    print(f"\ncluster up in {t_cluster:.1f}s, driver done at {t_driver:.1f}s, "
          f"total {time.monotonic() - t0:.1f}s")
