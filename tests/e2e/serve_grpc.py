"""Ray on loopback with Serve's HTTP and gRPC proxies, for test modules that speak both.

conftest's `serve_instance` starts the gRPC proxy without our services; a module that needs
them overrides `serve_instance` with `serve_with_grpc(grpc_port)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": servicer_functions()})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def engine_handle(app_name: str):
    from ray import serve

    return serve.get_deployment_handle("EngineDeployment", app_name=app_name)
