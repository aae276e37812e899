"""Every Prometheus metric moe-serve exports: name, type, labels, meaning.

The single list the exporter builds from, the README documents, and the tests check
against a live scrape. Ray's metrics pipeline prefixes every name with `ray_` and adds
`_total` to counters; histograms add `_bucket`, `_sum` and `_count`. Labels are bounded:
`outcome` has at most four values, `kind` and `repair` three or four, `rank` the group's size,
`layer` × `expert` the model's size.

Ray exports a family from its first record, so a family recorded only when its event happens
(a preemption, a fault, a change of the expert plane) is missing from a scrape until then;
`on_event` marks those, for the docs and for the tests that expect every other family.
"""

from __future__ import annotations

from dataclasses import dataclass

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
STEP_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
TOKEN_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
RECOVERY_BUCKETS_S = [0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
# A rebalance's background loads take seconds to minutes; a CPU scale event well under a second.
PLANE_EVENT_BUCKETS_S = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
# What steps waited for a plane change: none for a rebalance (first bucket), a process-group
# re-formation for a scale event or repair (issue 16 wants it bounded: the top bucket is 30 s).
PAUSE_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as we define it; exported as ray_<name>[_total]
    kind: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    description: str
    buckets: tuple[float, ...] = ()
    on_event: bool = False  # recorded only when its event happens: absent from a scrape until then

    @property
    def exported_name(self) -> str:
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The names its samples carry in a scrape (and that PromQL reads)."""
        if self.kind == "histogram":
            return tuple(f"ray_{self.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return (self.exported_name,)


CATALOG: tuple[MetricSpec, ...] = (
    # requests
    MetricSpec("moe_serve_time_to_first_token_seconds", "histogram", ("model",),
               "Arrival at the ingress to the first generated token", tuple(LATENCY_BUCKETS_S)),
    MetricSpec("moe_serve_inter_token_latency_seconds", "histogram", ("model",),
               "Time between consecutive generated tokens of a request", tuple(LATENCY_BUCKETS_S)),
    MetricSpec("moe_serve_e2e_request_latency_seconds", "histogram", ("model",),
               "Arrival at the ingress to the last token", tuple(LATENCY_BUCKETS_S)),
    MetricSpec("moe_serve_queue_time_seconds", "histogram", ("model",),
               "Arrival at the ingress until the engine scheduled the request's first step",
               tuple(LATENCY_BUCKETS_S)),
    MetricSpec("moe_serve_prompt_tokens", "counter", ("model",), "Prompt tokens of finished requests"),
    MetricSpec("moe_serve_generation_tokens", "counter", ("model",), "Tokens generated"),
    MetricSpec("moe_serve_requests", "counter", ("model", "outcome"),
               "Finished requests by outcome: stop, length, abort, error"),
    # engine
    MetricSpec("moe_serve_num_requests_running", "gauge", ("model",), "Sequences in the running queue"),
    MetricSpec("moe_serve_num_requests_waiting", "gauge", ("model",), "Sequences in the waiting queue"),
    MetricSpec("moe_serve_kv_blocks_used", "gauge", ("model",), "KV cache blocks in use"),
    MetricSpec("moe_serve_kv_blocks_total", "gauge", ("model",), "KV cache blocks in all"),
    MetricSpec("moe_serve_step_seconds", "histogram", ("model",), "Wall time of one engine step",
               tuple(STEP_BUCKETS_S)),
    MetricSpec("moe_serve_batch_tokens", "histogram", ("model",), "Tokens computed in one step",
               tuple(TOKEN_BUCKETS)),
    MetricSpec("moe_serve_preemptions", "counter", ("model",), "Sequences preempted for KV blocks",
               on_event=True),
    # data plane
    MetricSpec("moe_serve_expert_tokens", "counter", ("model", "layer", "expert"),
               "Rows routed to each (layer, expert), all replicas together"),
    MetricSpec("moe_serve_dispatch_seconds", "counter", ("model", "rank"),
               "Time spent in dispatch (all-to-all of routed tokens), per worker"),
    MetricSpec("moe_serve_combine_seconds", "counter", ("model", "rank"),
               "Time spent in combine (all-to-all back and weighted sum), per worker"),
    MetricSpec("moe_serve_dispatch_bytes", "counter", ("model", "rank"), "Bytes a worker sent in dispatch"),
    MetricSpec("moe_serve_combine_bytes", "counter", ("model", "rank"), "Bytes a worker sent in combine"),
    MetricSpec("moe_serve_worker_busy_seconds", "counter", ("model", "rank", "kind"),
               "Compute time: expert workers inside grouped experts, attention workers whole steps"),
    MetricSpec("moe_serve_expert_load_imbalance", "gauge", ("model", "layer"),
               "max / mean tokens per expert of a layer over the last reporting interval (1 = balanced)"),
    # faults
    MetricSpec("moe_serve_worker_restarts", "counter", ("model", "kind"), "Workers restarted after a fault",
               on_event=True),
    MetricSpec("moe_serve_worker_faults", "counter", ("model", "rank", "kind", "cause"),
               "Steps that failed because of a worker: which one (rank, kind; 'unknown' if unidentified) "
               "and why (died, collective_error, stalled)", on_event=True),
    MetricSpec("moe_serve_recoveries", "counter", ("model", "outcome"),
               "Worker-fault recoveries by outcome: recovered, failed, refused (too many in the window)",
               on_event=True),
    MetricSpec("moe_serve_recovery_seconds", "histogram", ("model",),
               "Worker fault seen until the model group serves again (or the engine gave up)",
               tuple(RECOVERY_BUCKETS_S), on_event=True),
    MetricSpec("moe_serve_repairs", "counter", ("model", "repair"),
               "Successful recoveries by what they replaced: expert_worker (every KV cache kept), "
               "attention_worker (its own sequences prefill again), group (all prefill again)",
               on_event=True),
    # expert plane (cluster/plane_event.py): placement, load per expert worker, its changes
    MetricSpec("moe_serve_expert_placement_version", "gauge", ("model",),
               "Version of the expert placement in force (each rebalance, scale event or repair that "
               "moves experts makes a new one)", on_event=True),
    MetricSpec("moe_serve_num_expert_workers", "gauge", ("model",), "Expert workers in the model group",
               on_event=True),
    MetricSpec("moe_serve_expert_worker_tokens", "counter", ("model", "rank"),
               "Rows each expert worker received, all its (layer, expert) copies together"),
    MetricSpec("moe_serve_expert_worker_load_imbalance", "gauge", ("model",),
               "max / mean tokens per expert worker over the last reporting interval (1 = balanced)"),
    MetricSpec("moe_serve_expert_plane_events", "counter", ("model", "kind", "outcome"),
               "Changes of the expert plane by kind (rebalance, scale_up, scale_down, repair) and "
               "outcome (done, abandoned: the group changed under it, failed)", on_event=True),
    MetricSpec("moe_serve_expert_plane_event_seconds", "histogram", ("model", "kind"),
               "Duration of an expert-plane change, background weight loads included",
               tuple(PLANE_EVENT_BUCKETS_S), on_event=True),
    MetricSpec("moe_serve_expert_plane_pause_seconds", "histogram", ("model", "kind"),
               "How long steps waited for an expert-plane change (re-forming the process group; "
               "0 for a rebalance)", tuple(PAUSE_BUCKETS_S), on_event=True),
)

BY_NAME = {m.name: m for m in CATALOG}
