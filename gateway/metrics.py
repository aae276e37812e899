"""Recording moe-serve's metrics through Ray's metrics pipeline (one scrape target per node).

`ServingMetrics` is created inside the engine deployment's replica (Ray metrics objects
must be made in the process that records them) and fed from: each finished request's timings,
the engine's stats after each step, the workers' drained stats, the engine's recovery events,
and the expert plane's placement and events (cluster/plane_event.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from cluster.engine_stats import EngineStats
from cluster.plane_event import PlaneEvent
from cluster.recovery_event import RecoveryEvent
from gateway.metric_catalog import CATALOG, MetricSpec
from workers.group.worker_stats import WorkerStats


def _make(spec: MetricSpec):
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.labels)
    return metrics.Histogram(spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels)


class ServingMetrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.m = {spec.name: _make(spec) for spec in CATALOG}
        self._last_preemptions = 0

    def _inc(self, name: str, value: float, tags: dict[str, str]) -> None:
        if value > 0:  # Ray counters refuse zero and negative increments
            self.m[name].inc(value, tags)

    def _tags(self, **extra: object) -> dict[str, str]:
        return {"model": self.model, **{k: str(v) for k, v in extra.items()}}

    def observe_request(self, *, outcome: str, num_prompt_tokens: int, num_output_tokens: int,
                        ttft_s: float | None, inter_token_s: Sequence[float], e2e_s: float,
                        queue_s: float | None) -> None:
        t = self._tags()
        if ttft_s is not None:
            self.m["moe_serve_time_to_first_token_seconds"].observe(ttft_s, t)
        for gap in inter_token_s:
            self.m["moe_serve_inter_token_latency_seconds"].observe(gap, t)
        self.m["moe_serve_e2e_request_latency_seconds"].observe(e2e_s, t)
        if queue_s is not None:
            self.m["moe_serve_queue_time_seconds"].observe(queue_s, t)
        self._inc("moe_serve_prompt_tokens", num_prompt_tokens, t)
        self._inc("moe_serve_requests", 1, self._tags(outcome=outcome))

    def observe_tokens(self, n: int) -> None:
        self._inc("moe_serve_generation_tokens", n, self._tags())

    def observe_engine(self, stats: EngineStats, step_ran: bool) -> None:
        t = self._tags()
        self.m["moe_serve_num_requests_running"].set(stats.num_running, t)
        self.m["moe_serve_num_requests_waiting"].set(stats.num_waiting, t)
        self.m["moe_serve_kv_blocks_used"].set(stats.num_kv_blocks_used, t)
        self.m["moe_serve_kv_blocks_total"].set(stats.num_kv_blocks_total, t)
        if step_ran:
            self.m["moe_serve_step_seconds"].observe(stats.last_step_seconds, t)
            self.m["moe_serve_batch_tokens"].observe(stats.last_step_tokens, t)
        new = stats.num_preemptions - self._last_preemptions
        self._inc("moe_serve_preemptions", new, t)
        self._last_preemptions = stats.num_preemptions

    def observe_workers(self, stats: Iterable[WorkerStats], num_experts: int) -> None:
        stats = list(stats)
        per_layer: dict[int, list[int]] = defaultdict(lambda: [0] * num_experts)
        for ws in stats:
            d, rank = ws.dispatch, self._tags(rank=ws.rank)
            self._inc("moe_serve_dispatch_seconds", d.dispatch_seconds, rank)
            self._inc("moe_serve_combine_seconds", d.combine_seconds, rank)
            self._inc("moe_serve_dispatch_bytes", d.dispatch_bytes_sent, rank)
            self._inc("moe_serve_combine_bytes", d.combine_bytes_sent, rank)
            self._inc("moe_serve_worker_busy_seconds", ws.busy_seconds,
                      self._tags(rank=ws.rank, kind=ws.kind))
            for (layer, expert), n in d.tokens_per_expert.items():
                per_layer[layer][expert] += n
        for layer, counts in per_layer.items():
            for expert, n in enumerate(counts):
                self._inc("moe_serve_expert_tokens", n, self._tags(layer=layer, expert=expert))
            self.m["moe_serve_expert_load_imbalance"].set(load_imbalance(counts), self._tags(layer=layer))
        per_worker = tokens_per_expert_worker(stats)
        for rank, n in per_worker.items():
            self._inc("moe_serve_expert_worker_tokens", n, self._tags(rank=rank))
        if per_worker:  # no expert worker reported (none drained this time): keep the last value
            self.m["moe_serve_expert_worker_load_imbalance"].set(load_imbalance(list(per_worker.values())),
                                                                 self._tags())

    def observe_restart(self, kind: str) -> None:
        self._inc("moe_serve_worker_restarts", 1, self._tags(kind=kind))

    def observe_recovery(self, event: RecoveryEvent) -> None:
        """One worker fault and what the engine did about it (cluster/recovery_event.py)."""
        fault = event.fault
        rank = "unknown" if fault.rank is None else fault.rank
        self._inc("moe_serve_worker_faults", 1, self._tags(rank=rank, kind=fault.kind, cause=fault.cause))
        self._inc("moe_serve_recoveries", 1, self._tags(outcome=event.outcome))
        self.m["moe_serve_recovery_seconds"].observe(event.seconds, self._tags())
        for kind in event.restarted_kinds:
            self.observe_restart(kind)
        if event.outcome == "recovered" and event.repair is not None:
            self._inc("moe_serve_repairs", 1, self._tags(repair=event.repair))

    def observe_placement(self, version: int, num_expert_workers: int) -> None:
        """The expert placement in force: at start and after every change of the expert plane."""
        self.m["moe_serve_expert_placement_version"].set(version, self._tags())
        self.m["moe_serve_num_expert_workers"].set(num_expert_workers, self._tags())

    def observe_plane_event(self, event: PlaneEvent) -> None:
        """One rebalance, scale event or repair of the expert plane, whatever its outcome."""
        by_kind = self._tags(kind=event.kind)
        self._inc("moe_serve_expert_plane_events", 1, self._tags(kind=event.kind, outcome=event.outcome))
        self.m["moe_serve_expert_plane_event_seconds"].observe(event.seconds, by_kind)
        # Observed for a rebalance too (0 s): its pause histogram is the evidence that no step waited.
        self.m["moe_serve_expert_plane_pause_seconds"].observe(event.pause_seconds, by_kind)
        self.observe_placement(event.placement_version, event.num_expert_workers)


def load_imbalance(counts: Sequence[int]) -> float:
    """max / mean of tokens per expert of a layer, or per expert worker; 1.0 when idle."""
    total = sum(counts)
    if not total:
        return 1.0
    return max(counts) / (total / len(counts))


def tokens_per_expert_worker(stats: Iterable[WorkerStats]) -> dict[int, int]:
    """Rank → rows an expert worker received, over all its (layer, expert) copies; attention workers
    are left out, an idle expert worker is in with 0 (it counts in the imbalance's mean)."""
    out: dict[int, int] = {}
    for ws in stats:
        if ws.kind == "expert":
            out[ws.rank] = out.get(ws.rank, 0) + sum(ws.dispatch.tokens_per_expert.values())
    return out
