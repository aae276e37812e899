"""gRPC listens only where `--host` says, not on every interface.

Ray Serve 2.60's gRPC proxy binds `[::]:PORT` (every interface, IPv4 and IPv6), and
`grpc_options` has no host. With the default `--host 127.0.0.1` that put an unauthenticated
generation API on the network while HTTP stayed on loopback. We enforce the host ourselves:

- Serve imports and calls the function named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` in
  every proxy actor's constructor, before the proxy creates its gRPC server (a documented hook,
  meant for HTTP middlewares). `bind_grpc_to_host` is that function: in the proxy's process it
  replaces Serve's `add_grpc_address` (which `start_grpc_server` looks up when it runs) by one
  that binds `MOE_SERVE_GRPC_HOST:PORT` instead of `[::]:PORT`, and returns no middlewares.
- `moe-serve serve` sets both variables before Ray starts, so the raylet and every worker
  (the proxies too) inherit them, and after `serve.start` it reads the machine's listening
  sockets (gateway/listening_sockets.py): if gRPC listens anywhere but the host (Ray moved the
  private function this patches, or a Serve that was already running on a joined cluster keeps
  its own binding) it refuses to serve rather than expose it.

Why not the other ways: our servicer adders (`grpc_servicer_functions`) also run inside the
proxy, but only after `add_insecure_port`, and gRPC binds and listens right there (checked: the
socket is in LISTEN before `server.start()`): nothing can narrow it afterwards. A TCP front on
HOST forwarding to Serve's proxy would still leave the proxy itself listening on `[::]`. Firewall
rules need root and live outside the process that knows the host.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

HOOK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
HOOK = "gateway.grpc_bind:bind_grpc_to_host"
HOST_ENV = "MOE_SERVE_GRPC_HOST"
# A callback the user had set already: ours calls it and returns its middlewares.
CHAINED_HOOK_ENV = "MOE_SERVE_CHAINED_PROXY_CALLBACK"


def grpc_listen_address(host: str, port: int) -> str:
    """gRPC's "host:port" for `host` (an IPv6 literal goes in brackets)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def hook_environment(host: str, environ: dict[str, str]) -> dict[str, str]:
    """The variables that make every Serve proxy started under `environ` bind gRPC to `host`."""
    env = {HOOK_ENV: HOOK, HOST_ENV: host}
    current = environ.get(HOOK_ENV)
    if current and current != HOOK:
        env[CHAINED_HOOK_ENV] = current
    return env


def bind_grpc_to_host() -> list:
    """Serve's proxy callback (see the module docstring); returns HTTP middlewares (none of ours)."""
    host = os.environ.get(HOST_ENV)
    if host:
        try:
            from ray.serve._private import default_impl
        except ImportError as exc:  # the listener check in `moe-serve serve` refuses to serve then
            log.error("moe-serve: cannot bind gRPC to %s: %s", host, exc)
        else:
            if hasattr(default_impl, "add_grpc_address"):
                default_impl.add_grpc_address = _bind_to(host)
            else:
                log.error("moe-serve: cannot bind gRPC to %s: Ray Serve has no add_grpc_address", host)
    chained = os.environ.get(CHAINED_HOOK_ENV)
    if not chained:
        return []
    from ray.serve._private.utils import call_function_from_import_path

    return call_function_from_import_path(chained) or []


def _bind_to(host: str):
    def add_grpc_address(grpc_server, server_address: str) -> None:
        port = int(server_address.rsplit(":", 1)[1])  # Serve passes "[::]:PORT"
        grpc_server.add_insecure_port(grpc_listen_address(host, port))

    return add_grpc_address
