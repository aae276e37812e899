"""`moe-serve serve`: start (or join) Ray, start Serve's HTTP and gRPC proxies, run the app, and
wait for Ctrl-C.

Without `--address` a one-node Ray cluster starts in this process and ends with it, exporting
Prometheus text on `--metrics-port`; with one (`auto`, or `host:port` of a running head), this
process joins that cluster, and on exit deletes only its own application, leaving Serve and the
cluster to whoever else uses them. gRPC listens only on `--host` (gateway/grpc_bind.py), checked
before the app is deployed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence

from gateway.app import APP_NAME, ServeOptions, build_app
from gateway.cluster_fit import check_cluster_fits
from gateway.drain import drain_app
from gateway.grpc_bind import hook_environment
from gateway.listening_sockets import beyond_host, listening_addresses
from gateway.serve_banner import MetricsEndpoint, banner, metrics_lines


def parse_expert_replicas(text: str) -> dict[tuple[int, int], int]:
    """"0:3=2,1:5=3" → {(0, 3): 2, (1, 5): 3}: layer 0's expert 3 gets 2 copies, and so on."""
    replicas: dict[tuple[int, int], int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            where, copies = item.split("=")
            layer, expert = where.split(":")
            replicas[int(layer), int(expert)] = int(copies)
        except ValueError:
            raise ValueError(f"expert replica {item!r} is not LAYER:EXPERT=COPIES") from None
    return replicas


def grpc_servicer_functions() -> list[str]:
    """Import paths of the gRPC servicers (ours and grpc.health.v1); none if gRPC is not built."""
    try:
        from gateway.grpc_stubs import servicer_functions
    except ImportError:
        return []
    return servicer_functions()


DEFAULT_METRICS_PORT = 8080  # what KubeRay and deploy/prometheus expect


def ray_init_kwargs(options: ServeOptions, address: str | None, metrics_port: int | None,
                    hook_env: Mapping[str, str]) -> dict:
    """`ray.init` arguments: join `address`, or start a one-node cluster of our own."""
    if address is not None:
        # Our env reaches Serve's controller (which this job starts unless Serve runs already) and
        # the proxies it starts through the job's runtime env; the listener check backs it up.
        return {"address": address, "configure_logging": False,
                "runtime_env": {"env_vars": dict(hook_env)}}
    kwargs: dict = {"address": "local", "configure_logging": False}
    port = DEFAULT_METRICS_PORT if metrics_port is None else metrics_port
    if port == 0:  # no exporter at all (Ray would otherwise pick a random port)
        kwargs["_system_config"] = {"enable_metrics_collection": False}
    else:
        kwargs["_metrics_export_port"] = port
    return kwargs


def metrics_endpoints(nodes: Sequence[Mapping], host: str, *, joined: bool) -> list[MetricsEndpoint]:
    """Where the alive nodes in `ray.nodes()` export metrics; our own node by the address we serve on."""
    out = []
    for node in nodes:
        port = node.get("MetricsExportPort") or 0
        if node.get("Alive") and port > 0:
            out.append(MetricsEndpoint(node["NodeManagerAddress"] if joined else host, port))
    return sorted(out, key=lambda e: (e.address, e.port))


def run_serve(options: ServeOptions, address: str | None = None, metrics_port: int | None = None) -> int:
    """Serve until Ctrl-C; the exit status. `metrics_port`: this cluster's export port (None: 8080,
    0: none); only for a cluster started here (joined nodes export where `ray start` said)."""
    import ray
    from ray import serve

    joined = address is not None
    if joined and metrics_port is not None:
        print("moe-serve serve: --metrics-port is for a cluster started here; a joined cluster's nodes "
              "export where `ray start --metrics-export-port` put them", file=sys.stderr)
        return 2
    if not joined:
        metrics_port = DEFAULT_METRICS_PORT if metrics_port is None else metrics_port
        if metrics_port and not port_is_free(metrics_port):  # Ray would start without its exporter
            print(f"moe-serve serve: metrics port {metrics_port} is in use: choose another with "
                  "--metrics-port PORT (0: no metrics)", file=sys.stderr)
            return 2
    hook_env = hook_environment(options.host, os.environ)
    os.environ.update(hook_env)  # before Ray starts: the raylet, and so every proxy, inherits it
    ray.init(**ray_init_kwargs(options, address, metrics_port, hook_env))
    try:
        servicers = grpc_servicer_functions()
        serve.start(
            http_options={"host": options.host, "port": options.port},
            # Serve's own reflection answers without a key; the ingress serves reflection behind it.
            grpc_options={"port": options.grpc_port, "grpc_servicer_functions": servicers,
                          "enable_reflection": False},
        )
        exposed = beyond_host(options.host, listening_addresses(options.grpc_port)) if servicers else []
        if exposed:
            print(f"moe-serve serve: Serve's gRPC proxy listens on {', '.join(map(str, exposed))} port "
                  f"{options.grpc_port}, beyond --host {options.host}; not serving. (A Serve started "
                  "earlier on this cluster keeps its own binding: restart it, or pass --host 0.0.0.0 "
                  "if every interface is meant.)", file=sys.stderr, flush=True)
            return 1  # nothing of ours is deployed yet
        check_cluster_fits(options, ray.available_resources(), joined=joined)  # ClusterTooSmall: cli.py
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
        endpoints = metrics_endpoints(ray.nodes(), options.host, joined=joined)
        key_from_env = options.api_key is not None and os.environ.get("MOE_SERVE_API_KEY") == options.api_key
        print(banner(options, grpc=bool(servicers), key_from_env=key_from_env,
                     metrics=metrics_lines(endpoints, joined=joined, metrics_port=metrics_port),
                     memory=engine_memory()), flush=True)
        wait_for_interrupt()
        # Drain first: in-flight streams finish while new requests get 503 (gateway/drain.py); a
        # second Ctrl-C stops at once.
        timeout_s = options.graceful_shutdown_timeout_s
        print(f"\nmoe-serve: draining (new requests get 503) for at most {timeout_s:g} s", flush=True)
        with drain_app(APP_NAME, timeout_s) as num_left:
            if num_left:
                print(f"moe-serve: {num_left} requests were still running at the drain deadline", flush=True)
            print("moe-serve: shutting down", flush=True)
            stop_serving()
    except BaseException:
        stop_serving()
        raise
    finally:
        ray.shutdown()
    print("moe-serve: stopped", flush=True)
    return 0


def engine_memory() -> tuple:
    """An engine replica's MemoryReports (every replica builds the same), for the banner."""
    from ray import serve

    try:
        info = serve.get_deployment_handle("EngineDeployment", APP_NAME).info.remote().result(timeout_s=30)
    except Exception as exc:  # the banner goes out without it rather than not at all
        print(f"moe-serve: could not read the engine's memory report: {type(exc).__name__}", flush=True)
        return ()
    return info.memory


def stop_serving() -> None:
    """Delete our application; once (a second call finds nothing to delete).

    Not `serve.shutdown()`, even for a cluster of our own: the controller kills itself while the
    call that asked it to is still pending, and Ray reports that call as failed ("ServeController.
    graceful_shutdown failed ... killed by ray.kill"). Deleting the app drains and stops its
    replicas (and so their workers); our own cluster's `ray.shutdown()` then takes the controller and
    proxies down with it, and a joined cluster keeps its Serve for whoever else uses it.
    """
    from ray import serve

    try:
        serve.delete(APP_NAME)
    except Exception as exc:  # already gone, or Ray is going down
        print(f"moe-serve: while stopping: {type(exc).__name__}: {exc}", flush=True)


def port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (how Kubernetes and process managers stop us)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
