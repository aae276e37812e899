"""`moe-serve serve`: start (or join) Ray, start Serve's HTTP and gRPC proxies, run the app, and
wait for Ctrl-C.

Without `--address` a one-node Ray cluster starts in this process and ends with it; with one
(`auto`, or `host:port` of a running head), this process joins that cluster, and on exit deletes
only its own application, leaving Serve and the cluster to whoever else uses them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Mapping

from gateway.app import APP_NAME, ServeOptions, build_app
from gateway.drain import drain_app


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


def run_serve(options: ServeOptions, address: str | None = None) -> int:
    import ray
    from ray import serve

    joined = address is not None
    ray.init(address=address if joined else "local", configure_logging=False)
    try:
        servicers = grpc_servicer_functions()
        serve.start(
            http_options={"host": options.host, "port": options.port},
            # Serve's own reflection answers without a key; the ingress serves reflection behind it.
            grpc_options={"port": options.grpc_port, "grpc_servicer_functions": servicers,
                          "enable_reflection": False},
        )
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
        print(banner(options, grpc=bool(servicers)), flush=True)
        wait_for_interrupt()
        # Drain first: in-flight streams finish while new requests get 503 (gateway/drain.py); a
        # second Ctrl-C stops at once.
        timeout_s = options.graceful_shutdown_timeout_s
        print(f"\nmoe-serve: draining (new requests get 503) for at most {timeout_s:g} s", flush=True)
        with drain_app(APP_NAME, timeout_s) as num_left:
            if num_left:
                print(f"moe-serve: {num_left} requests were still running at the drain deadline", flush=True)
            print("moe-serve: shutting down", flush=True)
            stop_serving(joined)
    except BaseException:
        stop_serving(joined)
        raise
    finally:
        ray.shutdown()
    return 0


def stop_serving(joined: bool) -> None:
    """Delete our application (joined to a cluster) or shut Serve down (ours); once."""
    from ray import serve

    try:
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    except Exception as exc:  # already gone, or Ray is going down
        print(f"moe-serve: while stopping: {type(exc).__name__}: {exc}", flush=True)


def banner(options: ServeOptions, *, grpc: bool) -> str:
    base = f"http://{options.host}:{options.port}"
    auth = ' -H "Authorization: Bearer $MOE_SERVE_API_KEY"' if options.api_key else ""
    body = {"model": options.served_model_name, "prompt": "The capital of France is", "max_tokens": 16}
    lines = [
        f"moe-serve: serving {options.served_model_name!r} from {options.model_dir}",
        f"  OpenAI API  {base}/v1   (completions, chat/completions, models)",
        f"  health      {base}/health   ready {base}/ready",
    ]
    if options.autoscaling is not None:
        scale = options.autoscaling
        lines.append(f"  autoscaling {scale.min_replicas}..{scale.max_replicas} model groups, "
                     f"~{scale.target_ongoing_requests:g} ongoing requests each")
    if grpc:
        lines.append(f"  gRPC        {options.host}:{options.grpc_port}   "
                     "(moe_serve.v1.MoeServe, grpc.health.v1)")
    lines += [
        "Try:",
        f"  curl {base}/v1/completions -H 'Content-Type: application/json'{auth} \\",
        f"    -d '{_json(body)}'",
        "Ctrl-C stops.",
    ]
    return "\n".join(lines)


def _json(payload: Mapping) -> str:
    import json

    return json.dumps(payload)


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
