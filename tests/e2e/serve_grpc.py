"""Ray on loopback with Serve's HTTP and gRPC proxies, for test modules that speak both, and
waiting for an app's engine to go idle.

conftest's `serve_instance` starts the gRPC proxy without our services; a module that needs
them overrides `serve_instance` with `serve_with_grpc(grpc_port)`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from tests.e2e.conftest import free_port


@contextmanager
def serve_with_grpc(grpc_port: int) -> Iterator[str]:
    """Start Ray (4 logical CPUs) and Serve with moe_serve.v1 + grpc.health.v1; yield the HTTP URL."""
    import ray
    from ray import serve

    from gateway.grpc_stubs import servicer_functions

    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    port = free_port()
    try:
        # As `moe-serve serve` starts it: Serve's reflection off, ours (behind the key) answers.
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": servicer_functions(),
                                  "enable_reflection": False})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


class WithMetadata(grpc.StreamStreamClientInterceptor):
    """Adds metadata to stream-stream calls: the reflection client has no parameter for it."""

    def __init__(self, metadata) -> None:
        self.metadata = tuple(metadata)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, request_iterator)


def engine_handle(app_name: str):
    from ray import serve

    return serve.get_deployment_handle("EngineDeployment", app_name=app_name)


def wait_until_idle(app_name: str, timeout_s: float = 60):
    """Poll the app's engine until no sequence runs or waits and no KV block is used; its stats."""
    engine = engine_handle(app_name)
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats.remote().result()
        if stats.num_running + stats.num_waiting + stats.num_kv_blocks_used == 0:
            return stats
        assert time.monotonic() < deadline, f"the engine still holds sequences: {stats}"
        time.sleep(0.1)
