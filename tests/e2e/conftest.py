"""The whole cluster behind Serve's HTTP proxy, shared by a test module.

`serve_instance` starts Ray on loopback and Serve on free ports once per module (it costs
seconds); `openai_server` runs the app `moe-serve serve` runs, on the demo model with a small
expert-parallel group (1 attention + 2 expert workers, fractional CPUs, so a 2-core machine
fits it); `keyed_server` adds a second app with an API key, the single-process engine (cheaper)
and a route prefix, on the same Serve instance.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import pytest

API_KEY = "sk-e2e-test-key"


@dataclass(frozen=True)
class Server:
    url: str  # the app's root: GET {url}/health
    app_name: str
    model_name: str
    model_dir: str
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        """What the openai client takes as `base_url`."""
        return f"{self.url}/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def serve_instance(grpc_port):
    """Ray (loopback, 4 logical CPUs) and Serve's HTTP and gRPC proxies as `moe-serve serve` starts
    them (our services and grpc.health.v1; Serve's own reflection off, ours is behind the key);
    yields the HTTP proxy's URL."""
    import ray
    from ray import serve

    from gateway.grpc_stubs import servicer_functions

    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": servicer_functions(),
                                  "enable_reflection": False})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def run_app(url: str, options, name: str, route_prefix: str) -> Server:
    import httpx
    from ray import serve

    from gateway.app import build_app

    serve.run(build_app(options), name=name, route_prefix=route_prefix, blocking=False)
    server = Server(url=url.rstrip("/") + route_prefix.rstrip("/"), app_name=name,
                    model_name=options.served_model_name, model_dir=options.model_dir,
                    api_key=options.api_key)
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, f"{name} never became ready"
        time.sleep(0.5)
    return server


@pytest.fixture(scope="module")
def openai_server(serve_instance, demo_model_dir) -> Server:
    from gateway.app import ServeOptions

    options = ServeOptions(model_dir=str(demo_model_dir), model_name="demo", num_attention_workers=1,
                           num_expert_workers=2, num_cpus_per_worker=0.25, max_num_seqs=32, num_kv_blocks=512)
    return run_app(serve_instance, options, "e2e", "/")


@pytest.fixture(scope="module")
def keyed_server(serve_instance, demo_model_dir) -> Server:
    from gateway.app import ServeOptions

    options = ServeOptions(model_dir=str(demo_model_dir), model_name="demo", num_expert_workers=0,
                           num_cpus_per_worker=0.25, max_num_seqs=8, num_kv_blocks=256, api_key=API_KEY)
    return run_app(serve_instance, options, "e2e-keyed", "/keyed")
