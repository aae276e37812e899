"""Autoscaling the engine deployment: whole model groups come and go with the load.

Under a bounded streaming load (official `openai` client) Serve scales the engine deployment from
1 to 2 replicas; both replicas serve requests (Serve's per-replica request counter, scraped from
Ray's metrics export); when the load drops, Serve drains a replica and goes back to 1, and no
request fails on the way, neither while scaling up nor during the drain. That the removed replica
really had streams in flight when Serve began stopping it, and finished them, is read from Serve's
own logs (controller: "Stopping Replica"; replica: each stream's end and duration). The
distributed variant (1 attention + 1 expert worker per group) also checks that a removed group's
workers and placement group are gone.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.autoscaling import AutoscalingOptions
from tests.e2e.conftest import Server, free_port, run_app

ENGINE = "EngineDeployment"
# Short delays so a test sees both directions; a target of 4 streams per group, so 8 clients ask
# for 2 groups.
FAST = AutoscalingOptions(min_replicas=1, max_replicas=2, target_ongoing_requests=4, upscale_delay_s=2.0,
                          downscale_delay_s=4.0, metrics_interval_s=1.0, look_back_period_s=3.0)
NUM_CLIENTS = 8
MAX_TOKENS = 24
# Scale-down runs under four clients with long streams: 4 ongoing over a target of 4 asks for one
# group, and with four streams spread over two replicas the one Serve removes (the newest) almost
# surely has a stream in flight to drain.
NUM_DRAIN_CLIENTS = 4
DRAIN_MAX_TOKENS = 200  # a few seconds per stream, longer than a drain check (graceful_shutdown_wait_loop_s)
MIN_SERVED_PER_REPLICA = 5
MAX_REQUESTS_PER_CLIENT = 200  # the load stops on a signal; these bound it if the signal never comes
MAX_LOAD_S = 240.0
SCALE_WAIT_S = 120.0


@pytest.fixture(scope="module")
def cluster():
    """Ray on loopback with metrics export, and Serve; yields (proxy URL, metrics URL)."""
    import ray
    from ray import serve

    metrics_port = free_port()
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()


@dataclass
class Load:
    """`num_clients` threads, each streaming completions one after another until `stop` is set."""

    server: Server
    num_clients: int
    max_tokens: int = MAX_TOKENS
    stop: threading.Event = field(default_factory=threading.Event)
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(self.num_clients)]
        for t in self._threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self._threads), "a client hung"

    @property
    def attempted(self) -> int:
        return self.ok + len(self.failures)

    def _client(self, index: int) -> None:
        client = openai.OpenAI(base_url=self.server.base_url, api_key="unused", max_retries=0, timeout=120)
        deadline = time.monotonic() + MAX_LOAD_S
        for n in range(MAX_REQUESTS_PER_CLIENT):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            try:
                finish, tokens = None, 0
                stream = client.completions.create(model=self.server.model_name,
                                                   prompt=f"Client {index}, {n}",
                                                   max_tokens=self.max_tokens, temperature=0.0, stream=True)
                for chunk in stream:
                    tokens += 1
                    finish = chunk.choices[0].finish_reason or finish
                error = None if finish in ("length", "stop") else f"no finish_reason after {tokens} chunks"
            except Exception as exc:  # any failure counts; the test asserts there are none
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                if error is None:
                    self.ok += 1
                else:
                    self.failures.append(error)


def replica_states(app: str) -> dict[str, int]:
    from ray import serve

    deployment = serve.status().applications[app].deployments[ENGINE]
    return {str(getattr(state, "value", state)): n for state, n in deployment.replica_states.items() if n}


def wait_for_replicas(app: str, running: int, timeout_s: float = SCALE_WAIT_S) -> list[dict[str, int]]:
    """Poll until exactly `running` replicas run and none starts or stops; returns what was seen."""
    seen: list[dict[str, int]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = replica_states(app)
        if not seen or seen[-1] != states:
            seen.append(states)
        if states == {"RUNNING": running}:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"{app}: never reached {running} running replicas; saw {seen}")


def requests_per_replica(metrics_url: str, app: str) -> Counter:
    """Requests each engine replica has finished, from Serve's own per-replica counter."""
    counts: Counter = Counter()
    for fam in text_string_to_metric_families(httpx.get(metrics_url, timeout=30).text):
        if fam.name == "ray_serve_deployment_request_counter":
            for s in fam.samples:
                if (s.name.endswith("_total") and s.labels.get("application") == app
                        and s.labels.get("deployment") == ENGINE):
                    counts[s.labels["replica"]] += s.value
    return counts


def both_served(counts: Counter) -> bool:
    return sum(1 for v in counts.values() if v >= MIN_SERVED_PER_REPLICA) >= 2


def wait_for_two_replicas_served(metrics_url: str, app: str, timeout_s: float = 90.0) -> Counter:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = requests_per_replica(metrics_url, app)
        if both_served(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


LOG_TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def _log_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")


def streams_in_flight_at_stop(app: str) -> dict[str, int]:
    """For each engine replica Serve has begun to stop: how many streams it was serving at that
    moment and still finished successfully (the drain). From Serve's own logs: the controller's
    "Stopping Replica" line, and the replica's access log ("CALL generate OK <duration>" at the
    end of each stream)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    stopped: dict[str, datetime] = {}
    for log in logs.glob("controller_*.log"):
        stop = LOG_TIME + rf".*Stopping Replica\(id='(\w+)', deployment='{ENGINE}', app='{app}'\)"
        for m in re.finditer(stop, log.read_text(errors="replace")):
            stopped.setdefault(m.group(2), _log_time(m.group(1)))
    in_flight: dict[str, int] = {}
    for replica, stop_time in stopped.items():
        in_flight[replica] = 0
        for log in logs.glob(f"replica_{app}_{ENGINE}_{replica}.log"):
            for m in re.finditer(LOG_TIME + r".* CALL generate OK ([\d.]+)ms",
                                 log.read_text(errors="replace")):
                end = _log_time(m.group(1))
                if end - timedelta(milliseconds=float(m.group(2))) < stop_time < end:
                    in_flight[replica] += 1
    return in_flight


def eventually(probe, expected, timeout_s: float = 30.0):
    """Poll `probe()` until it returns `expected` (Ray kills actors and frees groups asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while (got := probe()) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return got


def group_size() -> tuple[int, int, int]:
    """(attention workers, expert workers, placement groups) alive in the cluster."""
    return alive_actors("AttentionWorker"), alive_actors("ExpertWorker"), live_placement_groups()


def alive_actors(class_suffix: str) -> int:
    import ray

    return sum(1 for a in ray._private.state.actors().values()
               if a["State"] == "ALIVE" and a["ActorClassName"].endswith(class_suffix))


def live_placement_groups() -> int:
    import ray

    return sum(1 for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED")


GROUPS = [
    pytest.param(dict(num_expert_workers=0), id="single-process"),
    pytest.param(dict(num_attention_workers=1, num_expert_workers=1), id="model-group",
                 marks=pytest.mark.slow),  # two groups of three processes: about 2 minutes here
]


@pytest.mark.parametrize("group", GROUPS)
def test_engine_scales_up_under_load_and_drains_back_to_one(cluster, demo_model_dir, request, group):
    from ray import serve

    from gateway.app import ServeOptions

    url, metrics_url = cluster
    app = f"autoscale-{request.node.callspec.id}"
    options = ServeOptions(model_dir=str(demo_model_dir), model_name=app, num_cpus_per_worker=0.25,
                           max_num_seqs=8, num_kv_blocks=256, autoscaling=FAST,
                           graceful_shutdown_timeout_s=60.0, graceful_shutdown_wait_loop_s=0.25, **group)
    server = run_app(url, options, app, f"/{app}")
    distributed = options.num_expert_workers > 0
    try:
        assert replica_states(app) == {"RUNNING": 1}
        pgs_before = live_placement_groups()

        # Scale-up: 8 concurrent streams against a target of 4 per replica.
        heavy = Load(server, NUM_CLIENTS).start()
        try:
            seen_up = wait_for_replicas(app, 2)
            served = wait_for_two_replicas_served(metrics_url, app)
            if distributed:
                # Two whole groups: each replica started its own workers in its own placement group.
                assert eventually(group_size, (2, 2, pgs_before + 1)) == (2, 2, pgs_before + 1)
        finally:
            heavy.finish()
        assert heavy.failures == [], heavy.failures[:3]
        assert both_served(served), f"requests were not spread over both replicas: {dict(served)}"

        # Scale-down under a trickle: Serve picks a replica, stops routing to it, lets its streams
        # finish, and removes it; the trickle's requests must all succeed.
        trickle = Load(server, NUM_DRAIN_CLIENTS, max_tokens=DRAIN_MAX_TOKENS).start()
        try:
            seen_down = wait_for_replicas(app, 1)
        finally:
            trickle.finish()
        assert trickle.failures == [], trickle.failures[:3]
        assert trickle.ok > 0
        drained = streams_in_flight_at_stop(app)
        assert len(drained) == 1, f"not exactly one replica was stopped: {drained}"
        assert sum(drained.values()) > 0, f"the removed replica had no stream to drain: {drained}"

        if distributed:
            # The removed replica's destructor shut its workers down and Serve freed its group.
            assert eventually(group_size, (1, 1, pgs_before)) == (1, 1, pgs_before)
        print(f"\n[{app}] up: {seen_up}  down: {seen_down}  requests per replica: {dict(served)}  "
              f"streams drained: {drained}  "
              f"heavy ok={heavy.ok} trickle ok={trickle.ok}")
    finally:
        serve.delete(app)
