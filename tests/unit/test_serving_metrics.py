"""ServingMetrics records what the catalog says: the expert plane's events and placement, tokens and
imbalance per expert worker, repairs by kind.

Ray's metric objects are replaced by recorders that check each record the way Ray would refuse it
(a missing label, a non-string label value, a counter increment ≤ 0) and also refuse a label the
catalog does not declare; one test records through Ray's own objects, without a cluster, to show
Ray accepts the catalog (histogram boundaries, label keys) and the values we pass.
"""

from __future__ import annotations

import pytest

from cluster.plane_event import PlaneEvent
from cluster.recovery_event import RecoveryEvent
from cluster.worker_fault import WorkerFault
from gateway import metrics as metrics_module
from gateway.metric_catalog import BY_NAME, MetricSpec
from gateway.metrics import ServingMetrics, load_imbalance, tokens_per_expert_worker
from workers.group.worker_stats import WorkerStats
from workers.moe.a2a_dispatcher import DispatchStatsSnapshot


class Recorder:
    """One metric: its records as (value, labels without `model`)."""

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self.records: list[tuple[float, dict[str, str]]] = []

    def _record(self, value: float, tags: dict[str, str]) -> None:
        assert isinstance(value, (int, float)), (self.spec.name, value)
        assert set(tags) == set(self.spec.labels), (self.spec.name, tags)
        assert all(isinstance(v, str) for v in tags.values()), (self.spec.name, tags)
        assert tags["model"] == "m"
        self.records.append((value, {k: v for k, v in tags.items() if k != "model"}))

    def inc(self, value: float, tags: dict[str, str]) -> None:
        assert self.spec.kind == "counter" and value > 0, (self.spec.name, value)
        self._record(value, tags)

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert self.spec.kind == "gauge", self.spec.name
        self._record(value, tags)

    def observe(self, value: float, tags: dict[str, str]) -> None:
        assert self.spec.kind == "histogram", self.spec.name
        self._record(value, tags)

    def total(self, **labels: str) -> float:
        return sum(v for v, t in self.records if labels.items() <= t.items())

    def last(self, **labels: str) -> float:
        return [v for v, t in self.records if labels.items() <= t.items()][-1]


@pytest.fixture
def sm(monkeypatch) -> ServingMetrics:
    monkeypatch.setattr(metrics_module, "_make", Recorder)
    return ServingMetrics("m")


def worker(rank: int, kind: str, tokens: dict[tuple[int, int], int], busy: float = 0.0) -> WorkerStats:
    snapshot = DispatchStatsSnapshot(tokens_per_expert=tokens, num_dispatches=1, num_dropped=0,
                                     dispatch_seconds=0.0, combine_seconds=0.0, dispatch_bytes_sent=0,
                                     dispatch_bytes_received=0, combine_bytes_sent=0,
                                     combine_bytes_received=0)
    return WorkerStats(rank=rank, kind=kind, dispatch=snapshot, busy_seconds=busy, num_steps=1)


def plane_event(kind: str, outcome: str = "done", *, version: int = 1, num_expert_workers: int = 2,
                seconds: float = 1.0, pause_seconds: float = 0.0) -> PlaneEvent:
    return PlaneEvent(kind=kind, outcome=outcome, placement_version=version,
                      num_expert_workers=num_expert_workers, seconds=seconds, pause_seconds=pause_seconds)


def recovery(outcome: str, repair: str | None) -> RecoveryEvent:
    fault = WorkerFault(rank=2, kind="expert", cause="died", detail="SIGKILL")
    return RecoveryEvent(fault=fault, outcome=outcome, seconds=1.5, restarted_kinds=("expert",),
                         repair=repair)


def test_tokens_per_expert_worker_sums_each_expert_workers_rows_and_leaves_attention_out():
    stats = [worker(0, "attention", {}), worker(1, "expert", {(0, 0): 5, (0, 1): 2, (1, 0): 3}),
             worker(2, "expert", {}), worker(3, "expert", {(1, 3): 4})]
    assert tokens_per_expert_worker(stats) == {1: 10, 2: 0, 3: 4}


def test_load_imbalance_over_expert_workers_is_max_over_mean_and_one_when_idle():
    assert load_imbalance([10, 0, 4, 2]) == 10 / 4
    assert load_imbalance([3, 3]) == 1.0
    assert load_imbalance([0, 0]) == 1.0


def test_observe_workers_counts_tokens_per_expert_worker_and_sets_their_imbalance(sm):
    stats = [worker(0, "attention", {}, busy=0.5), worker(1, "expert", {(0, 0): 6, (1, 2): 6}, busy=0.25),
             worker(2, "expert", {(0, 1): 4}, busy=0.125)]
    sm.observe_workers(stats, num_experts=4)
    tokens = sm.m["moe_serve_expert_worker_tokens"]
    assert tokens.records == [(12, {"rank": "1"}), (4, {"rank": "2"})]  # attention worker 0 not labelled
    assert sm.m["moe_serve_expert_worker_load_imbalance"].last() == 12 / 8
    # The same rows as the per-(layer, expert) family, counted by where they landed.
    assert tokens.total() == sm.m["moe_serve_expert_tokens"].total() == 16
    # Busy time per worker is still there, for both kinds.
    busy = sm.m["moe_serve_worker_busy_seconds"]
    assert busy.total(rank="0", kind="attention") == 0.5 and busy.total(rank="2", kind="expert") == 0.125
    # Accumulates over intervals; the imbalance is the last interval's alone.
    sm.observe_workers(iter([worker(1, "expert", {(0, 0): 1}), worker(2, "expert", {(0, 1): 1})]), 4)
    assert tokens.total(rank="1") == 13 and tokens.total(rank="2") == 5
    assert sm.m["moe_serve_expert_worker_load_imbalance"].last() == 1.0


def test_an_idle_expert_worker_counts_in_the_imbalance_without_a_zero_increment(sm):
    sm.observe_workers([worker(1, "expert", {(0, 0): 9}), worker(2, "expert", {}), worker(3, "expert", {})],
                       num_experts=4)
    assert sm.m["moe_serve_expert_worker_tokens"].records == [(9, {"rank": "1"})]
    assert sm.m["moe_serve_expert_worker_load_imbalance"].last() == 3.0
    sm.observe_workers([worker(1, "expert", {}), worker(2, "expert", {})], 4)
    assert sm.m["moe_serve_expert_worker_load_imbalance"].last() == 1.0  # idle


def test_no_expert_worker_in_the_interval_leaves_the_imbalance_alone(sm):
    sm.observe_workers([worker(0, "attention", {})], 4)
    assert sm.m["moe_serve_expert_worker_load_imbalance"].records == []
    assert sm.m["moe_serve_expert_worker_tokens"].records == []


def test_observe_placement_sets_the_version_and_the_expert_workers(sm):
    sm.observe_placement(0, 4)
    sm.observe_placement(3, 5)
    assert sm.m["moe_serve_expert_placement_version"].records == [(0, {}), (3, {})]
    assert sm.m["moe_serve_num_expert_workers"].records == [(4, {}), (5, {})]


def test_observe_plane_event_counts_times_and_sets_the_placement(sm):
    sm.observe_plane_event(plane_event("rebalance", version=1, num_expert_workers=4, seconds=12.0))
    sm.observe_plane_event(plane_event("scale_up", version=2, num_expert_workers=5, seconds=3.0,
                                       pause_seconds=0.4))
    sm.observe_plane_event(plane_event("scale_down", "abandoned", version=2, num_expert_workers=5,
                                       seconds=0.7, pause_seconds=0.0))
    events = sm.m["moe_serve_expert_plane_events"]
    assert events.records == [(1, {"kind": "rebalance", "outcome": "done"}),
                              (1, {"kind": "scale_up", "outcome": "done"}),
                              (1, {"kind": "scale_down", "outcome": "abandoned"})]
    assert sm.m["moe_serve_expert_plane_event_seconds"].records == [
        (12.0, {"kind": "rebalance"}), (3.0, {"kind": "scale_up"}), (0.7, {"kind": "scale_down"})]
    # A rebalance is observed with its zero pause: the histogram shows no step waited for it.
    assert sm.m["moe_serve_expert_plane_pause_seconds"].records == [
        (0.0, {"kind": "rebalance"}), (0.4, {"kind": "scale_up"}), (0.0, {"kind": "scale_down"})]
    assert sm.m["moe_serve_expert_placement_version"].last() == 2
    assert sm.m["moe_serve_num_expert_workers"].records == [(4, {}), (5, {}), (5, {})]


@pytest.mark.parametrize("kind", ["rebalance", "scale_up", "scale_down", "repair"])
@pytest.mark.parametrize("outcome", ["done", "abandoned", "failed"])
def test_every_kind_and_outcome_records_within_the_declared_labels(sm, kind, outcome):
    sm.observe_plane_event(plane_event(kind, outcome, pause_seconds=0.05))
    assert sm.m["moe_serve_expert_plane_events"].total(kind=kind, outcome=outcome) == 1


def test_pause_buckets_run_from_a_millisecond_to_thirty_seconds():
    buckets = BY_NAME["moe_serve_expert_plane_pause_seconds"].buckets
    assert buckets[0] == 0.001 and buckets[-1] == 30.0 and list(buckets) == sorted(buckets)


def test_repairs_are_counted_by_kind_only_when_recovered(sm):
    sm.observe_recovery(recovery("recovered", "expert_worker"))
    sm.observe_recovery(recovery("recovered", "expert_worker"))
    sm.observe_recovery(recovery("recovered", "group"))
    sm.observe_recovery(recovery("failed", None))
    sm.observe_recovery(recovery("refused", None))
    repairs = sm.m["moe_serve_repairs"]
    assert repairs.total(repair="expert_worker") == 2 and repairs.total(repair="group") == 1
    assert repairs.total() == 3
    assert sm.m["moe_serve_recoveries"].total() == 5  # every recovery is still counted by outcome


def test_ray_accepts_the_catalog_and_every_new_record():
    sm = ServingMetrics("m")  # no cluster: Ray validates, records nowhere
    stats = [worker(0, "attention", {}), worker(1, "expert", {(0, 0): 3}), worker(2, "expert", {})]
    sm.observe_workers(stats, num_experts=4)
    sm.observe_placement(0, 2)
    for kind in ("rebalance", "scale_up", "scale_down", "repair"):
        sm.observe_plane_event(plane_event(kind, pause_seconds=0.0 if kind == "rebalance" else 0.2))
    sm.observe_recovery(recovery("recovered", "attention_worker"))
    pause = sm.m["moe_serve_expert_plane_pause_seconds"]
    assert type(pause).__module__.startswith("ray.") and pause.boundaries[0] == 0.001
