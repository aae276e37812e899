"""What `moe-serve serve` prints once it is ready: where everything listens, the layout it runs,
where the metrics are, and a request to paste.

Pure functions of the options and what Ray reported, so tests read the text without a cluster.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.app import ServeOptions
from gateway.demo_checkpoint import MARKER_FILE as DEMO_MARKER_FILE
from workers.device.memory import MemoryReport

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
SAMPLE_PROMPT = "Once upon a time"  # a continuation, not a question: the demo model's text is random
MAX_LISTED_NODES = 8


@dataclass(frozen=True)
class MetricsEndpoint:
    """One Ray node's Prometheus export: http://{address}:{port}/metrics."""

    address: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{url_host(self.address)}:{self.port}/metrics"


def url_host(host: str) -> str:
    """`host` as it goes in a URL a client on this machine can use: a wildcard bind address is
    reached at 127.0.0.1, an IPv6 literal goes in brackets."""
    if host in WILDCARD_HOSTS:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def listen_note(host: str) -> str:
    return f"   (listening on {host or '*'}: every interface)" if host in WILDCARD_HOSTS else ""


def layout_line(options: ServeOptions) -> str:
    """The model group this serves: workers, device and dtype."""
    if options.num_expert_workers == 0:
        workers = "the whole model in one engine replica (no expert workers)"
    else:
        workers = (f"{options.num_attention_workers} attention + {options.num_expert_workers} expert "
                   "workers per model group")
    groups = "" if options.autoscaling is not None or options.num_engine_replicas == 1 \
        else f", {options.num_engine_replicas} model groups"
    # As configured: each worker resolves "auto" itself (its GPU if Ray gave it one, else the CPU).
    gpus = f" ({options.num_gpus_per_worker:g} GPU per worker)" if options.num_gpus_per_worker else ""
    return f"  layout      {workers}{groups}, device {options.device}{gpus}, dtype {options.dtype}"


def expert_plane_lines(options: ServeOptions) -> list[str]:
    """Rebalancing and expert-worker autoscaling, when either is on: e.g. "rebalance on (threshold
    1.3), expert workers 2..4 (autoscaling)". Workers above the starting count are not reserved."""
    rebalance, scaling = options.elastic.rebalance, options.elastic.autoscaling
    if not (rebalance.enabled or scaling.enabled):
        return []
    moves = "rebalance off"
    if rebalance.enabled:
        copies = rebalance.extra_copies_per_layer
        extra = f", {copies} extra expert cop{'y' if copies == 1 else 'ies'} per layer" if copies else ""
        moves = f"rebalance on (threshold {rebalance.threshold:g}{extra})"
    start = options.num_expert_workers
    if scaling.enabled:
        lo, hi = scaling.bounds(start)
        workers = f"expert workers {lo}..{hi} (autoscaling from {start})"
    else:
        workers = f"{start} expert workers (fixed)"
    return [f"  expert plane {moves}, {workers}"]


def metrics_lines(endpoints: Sequence[MetricsEndpoint], *, joined: bool,
                  metrics_port: int | None) -> list[str]:
    """Where Prometheus text is: this cluster's one node, or every node of a joined cluster."""
    if not joined:
        if metrics_port == 0 or not endpoints:
            return ["  metrics     off (--metrics-port 0)"]
        return [f"  metrics     {endpoints[0].url}"]
    if not endpoints:
        return ["  metrics     the cluster's nodes export none (started without a metrics port?)"]
    count = f"{len(endpoints)} node" + ("s" if len(endpoints) != 1 else "")
    lines = [f"  metrics     each node of the cluster exports its own ({count}):"]
    lines += [f"              {e.url}" for e in endpoints[:MAX_LISTED_NODES]]
    if len(endpoints) > MAX_LISTED_NODES:
        lines.append(f"              ... and {len(endpoints) - MAX_LISTED_NODES} more (ray list nodes)")
    return lines


def auth_header(options: ServeOptions, *, key_from_env: bool) -> str:
    """The curl option that sends the key the way it was given: the variable, or the key itself."""
    if options.api_key is None:
        return ""
    if key_from_env:
        return ' -H "Authorization: Bearer $MOE_SERVE_API_KEY"'
    return " -H " + shlex.quote(f"Authorization: Bearer {options.api_key}")


def is_demo_model(model_dir: str) -> bool:
    return (Path(model_dir) / DEMO_MARKER_FILE).is_file()


def memory_line(options: ServeOptions, reports: Sequence[MemoryReport]) -> list[str]:
    """What the KV-cache holders resolved at start: device, dtype, weights, KV blocks, longest context."""
    if not reports:
        return []
    who = "engine replica" if options.num_expert_workers == 0 else (
        "attention worker" if len(reports) == 1 else f"each of {len(reports)} attention workers")
    return [f"  memory      {who}: {reports[0].summary()}"]


def banner(options: ServeOptions, *, grpc: bool, key_from_env: bool,
           metrics: Sequence[str] = (), memory: Sequence[MemoryReport] = ()) -> str:
    """The ready message. `metrics` are the lines of `metrics_lines`, `memory` what the engine's
    KV-cache holders report (ModelInfo.memory)."""
    base = f"http://{url_host(options.host)}:{options.port}"
    body = {"model": options.served_model_name, "prompt": SAMPLE_PROMPT, "max_tokens": 16}
    lines = [
        f"moe-serve: serving {options.served_model_name!r} from {options.model_dir}",
        layout_line(options),
        *expert_plane_lines(options),
        *memory_line(options, memory),
        f"  OpenAI API  {base}/v1   (completions, chat/completions, models){listen_note(options.host)}",
        f"  health      {base}/health   ready {base}/ready",
    ]
    if options.autoscaling is not None:
        scale = options.autoscaling
        lines.append(f"  autoscaling {scale.min_replicas}..{scale.max_replicas} model groups, "
                     f"~{scale.target_ongoing_requests:g} ongoing requests each")
    if grpc:
        lines.append(f"  gRPC        {url_host(options.host)}:{options.grpc_port}   "
                     f"(moe_serve.v1.MoeServe, grpc.health.v1, reflection){listen_note(options.host)}")
    lines += list(metrics)
    lines += [
        "Try:",
        f"  curl {base}/v1/completions -H 'Content-Type: application/json'"
        f"{auth_header(options, key_from_env=key_from_env)} \\",
        f"    -d {shlex.quote(json.dumps(body))}",
    ]
    if is_demo_model(options.model_dir):
        lines.append("The demo model has random weights: expect random text, not an answer.")
    lines.append("Ctrl-C stops.")
    return "\n".join(lines)
