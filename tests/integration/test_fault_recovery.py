"""Worker faults on a real Ray model group (DESIGN.md §5), driving the engine directly.

Faults are real: SIGKILL of a worker process, SIGSTOP of one (a collective that stalls),
and `Cluster.remove_node` of a raylet holding expert workers. The oracle is the
single-process engine's fault-free greedy run of the same 50 requests (the distributed
engine equals it; tests/integration/test_distributed_engine.py): every request must end
with exactly those tokens, whatever happened in between, or, where recovery is impossible,
with an explicit error, within a bounded time.

All nodes of a cluster_utils.Cluster share one IP, so pids from `where()` are this
machine's and nodes are told apart by custom resources (see test_multinode_cluster.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.actor_state import actor_id
from cluster.distributed_engine import build_distributed_engine
from cluster.engine import Engine
from cluster.fault_config import FaultConfig
from cluster.local_engine import build_local_engine
from cluster.recovery_event import RecoveryEvent
from cluster.recovery_policy import RecoveryPolicy
from cluster.topology import TopologyConfig
from tests.fault_run import (
    ENGINE_CFG,
    LONG,
    MAX_TOKENS,
    NUM_REQUESTS,
    RUN_DEADLINE_S,
    grown_back,
    prompts,
    run,
    run_requests,
)


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster_utils.Cluster; the node-loss test adds the nodes it removes.

    Fast node-death detection (the default takes ~30 s) keeps the node-loss test short.
    """
    mp = pytest.MonkeyPatch()
    mp.setattr(ray._private.services, "resolve_ip_for_localhost", lambda host: host)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                           "health_check_timeout_ms": 500}})
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def reference(demo_model_dir) -> list[list[int]]:
    """The fault-free greedy tokens of every request (single-process engine)."""
    engine = build_local_engine(demo_model_dir, ENGINE_CFG)
    return run(engine, run_requests(engine, prompts()))["tokens"]


def build(model_dir, topology: TopologyConfig | None = None, **faults) -> tuple[Engine, object]:
    topology = topology or TopologyConfig(num_attention_workers=1, num_expert_workers=2,
                                          num_cpus_per_worker=0.1)
    cfg = dataclasses.replace(ENGINE_CFG, num_attention_workers=topology.num_attention_workers)
    return build_distributed_engine(model_dir, cfg, topology, faults=FaultConfig(**faults))


def pid_of(group, rank: int) -> int:
    (info,) = [w for w in group.where() if w["rank"] == rank]
    return info["pid"]


def assert_recovered(got: dict, reference: list[list[int]], rank: int, kind: str, cause: str,
                     world_size: int = 3, repair: str = "group") -> RecoveryEvent:
    """Every request ended as without the fault; the first recovery was the `repair` named (a
    group restart by default: every sequence prefilled again). Returns that recovery."""
    assert got["injected_at"] < NUM_REQUESTS * MAX_TOKENS  # the fault hit while requests streamed
    assert [r["finish_reason"] for r in got["results"]] == ["length"] * NUM_REQUESTS
    assert got["tokens"] == reference  # same greedy output as without the fault
    first = got["events"][0]
    assert (first.fault.rank, first.fault.kind, first.fault.cause) == (rank, kind, cause)
    assert first.fault.actor_id and first.fault.node_id
    assert all(e.outcome == "recovered" for e in got["events"])
    assert first.repair == repair
    if repair == "group":
        assert first.num_requeued == NUM_REQUESTS and len(first.restarted_kinds) == world_size
    return first


def actor_ids(group) -> list[str]:
    return [actor_id(w) for w in group.workers]


def test_sigkill_expert_worker_mid_stream_repairs_only_that_worker(cluster, demo_model_dir, reference):
    """Only the dead expert worker is replaced: the survivor takes its experts at once, a new
    worker joins in the background; the others keep their actors (so their weights, and the
    attention worker its KV cache), no sequence prefills again, the output is unchanged."""
    engine, group = build(demo_model_dir)
    plane_events = []
    group.plane_listeners.append(plane_events.append)
    try:
        victim, before = pid_of(group, 2), actor_ids(group)
        # The second run shows the group keeps serving after the repair.
        kill = lambda: os.kill(victim, signal.SIGKILL)  # noqa: E731
        got, _, again = run(engine, run_requests(engine, prompts(), fault=kill), grown_back(group),
                            run_requests(engine, prompts()[:5]))
        event = assert_recovered(got, reference, rank=2, kind="expert", cause="died", repair="expert_worker")
        assert len(got["events"]) == 1
        assert (event.restarted_kinds, event.num_requeued) == ((), 0)
        assert [(e.kind, e.outcome) for e in plane_events] == [("repair", "done"), ("scale_up", "done")]
        assert group.num_expert_workers == 2 and group.placement_version == 2
        after = actor_ids(group)
        assert after[:2] == before[:2] and after[2] != before[2]
        assert pid_of(group, 2) != victim
        stats = engine.stats()
        assert stats.num_worker_faults == stats.num_recoveries == 1 and stats.healthy
        assert again["tokens"] == reference[:5] and not again["events"]
        print(f"\none expert worker repaired in {event.seconds:.2f}s; every stream one token further "
              f"{got['resumed_after_s']:.2f}s after the kill")
    finally:
        group.shutdown()


def test_a_failed_repair_falls_back_to_the_group_restart(cluster, demo_model_dir, reference):
    engine, group = build(demo_model_dir)
    form_group, calls = group.form_group, []

    async def fails_once(placement_version=None):
        calls.append(placement_version)
        if len(calls) == 1:
            raise RuntimeError("injected: the group cannot re-form")
        return await form_group(placement_version)

    group.form_group = fails_once
    try:
        victim, before = pid_of(group, 2), actor_ids(group)
        got, _ = run(engine, run_requests(engine, prompts(), fault=lambda: os.kill(victim, signal.SIGKILL)),
                     grown_back(group))
        assert_recovered(got, reference, rank=2, kind="expert", cause="died", world_size=2)
        assert calls[0] == 1  # the repair's re-forming on the survivors' placement failed
        assert not set(actor_ids(group)) & set(before)  # every worker is new
        assert group.num_expert_workers == 2  # and the pool grew back to its size
    finally:
        group.shutdown()


def test_sigkill_attention_worker_mid_stream(cluster, demo_model_dir, reference):
    """An attention worker's KV cache dies with it: only it is replaced, and its sequences (here
    all of them: it is the only one) prefill again; the expert workers keep their actors."""
    engine, group = build(demo_model_dir)
    try:
        victim, before = pid_of(group, 0), actor_ids(group)
        got = run(engine, run_requests(engine, prompts(), fault=lambda: os.kill(victim, signal.SIGKILL)))
        event = assert_recovered(got, reference, rank=0, kind="attention", cause="died",
                                 repair="attention_worker")
        assert (event.restarted_kinds, event.num_requeued) == (("attention",), NUM_REQUESTS)
        after = actor_ids(group)
        assert after[0] != before[0] and after[1:] == before[1:]
        print(f"\nattention worker repaired in {event.seconds:.2f}s; every stream one token further "
              f"{got['resumed_after_s']:.2f}s after the kill")
    finally:
        group.shutdown()


@pytest.mark.slow
def test_sigkill_one_of_two_attention_workers(cluster, demo_model_dir, reference):
    """Data parallelism: only the dead attention worker's sequences (its KV cache) prefill again;
    the other attention worker keeps its cache and its sequences."""
    topology = TopologyConfig(num_attention_workers=2, num_expert_workers=3, num_cpus_per_worker=0.1)
    engine, group = build(demo_model_dir, topology)
    try:
        victim, before = pid_of(group, 1), actor_ids(group)
        got = run(engine, run_requests(engine, prompts(), fault=lambda: os.kill(victim, signal.SIGKILL)))
        event = assert_recovered(got, reference, rank=1, kind="attention", cause="died", world_size=5,
                                 repair="attention_worker")
        assert 0 < event.num_requeued < NUM_REQUESTS  # rank 1's running sequences, not rank 0's
        after = actor_ids(group)
        assert after[1] != before[1] and [a for r, a in enumerate(after) if r != 1] == \
            [a for r, a in enumerate(before) if r != 1]
    finally:
        group.shutdown()


def test_stalled_collective_is_caught_by_the_watchdog(cluster, demo_model_dir, reference):
    """SIGSTOP an expert: its peers block in the all-to-all; the step watchdog fires and recovers."""
    step_timeout_s = 10.0  # well above a normal step here, even with other tests running
    engine, group = build(demo_model_dir, step_timeout_s=step_timeout_s)
    victim = pid_of(group, 1)
    try:
        t0 = time.monotonic()
        got, _ = run(engine, run_requests(engine, prompts(), fault=lambda: os.kill(victim, signal.SIGSTOP)),
                     grown_back(group))
        event = assert_recovered(got, reference, rank=1, kind="expert", cause="stalled",
                                 repair="expert_worker")
        assert event.num_requeued == 0  # the stalled worker was killed and dropped; no KV cache lost
        assert "probe" in event.fault.detail
        assert time.monotonic() - t0 < RUN_DEADLINE_S
    finally:
        try:
            os.kill(victim, signal.SIGCONT)  # Ray killed it; if not, let it die normally
        except ProcessLookupError:
            pass
        group.shutdown()


def test_too_many_failures_end_every_request_with_an_error(cluster, demo_model_dir):
    engine, group = build(demo_model_dir, recovery=RecoveryPolicy(max_recoveries=1, window_s=600))
    try:
        def kill(rank):
            return lambda: os.kill(pid_of(group, rank), signal.SIGKILL)

        first, second, late = run(
            engine,
            run_requests(engine, prompts()[:10], fault=kill(1), fault_after=10 * 4),
            run_requests(engine, prompts()[:10], fault=kill(1), fault_after=10 * 4),
            run_requests(engine, prompts()[:2]),
        )
        assert [e.outcome for e in first["events"]] == ["recovered"]
        assert all(r["finish_reason"] == "length" for r in first["results"])
        assert [e.outcome for e in second["events"]] == ["refused"]
        for r in second["results"]:
            assert r["finish_reason"] == "error"
            assert "engine unavailable" in r["error"] and "expert worker rank 1" in r["error"]
        assert not engine.healthy and not engine.stats().healthy
        # New requests are refused at once with the same explicit error.
        assert [r["finish_reason"] for r in late["results"]] == ["error", "error"]
        assert late["results"][0]["error"] == engine.unhealthy_reason
    finally:
        group.shutdown()


@pytest.mark.slow
def test_node_loss_recovers_onto_a_spare_node_then_fails_explicitly_without_one(cluster, demo_model_dir,
                                                                                reference):
    """Expert workers sit one per expert node (custom resources); removing a node that holds one
    hands its experts to the survivor, and the worker that grows the pool back starts where Ray
    moved the lost bundle: the spare node. Losing the attention node leaves its bundle nowhere
    to go: explicit errors."""
    cl = cluster
    nodes = {name: cl.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={resource: 1})
             for name, resource in (("attention", "moe_attention"), ("expert_a", "moe_expert"),
                                    ("expert_b", "moe_expert"), ("expert_spare", "moe_expert"))}
    cl.wait_for_nodes()
    topology = TopologyConfig(num_attention_workers=1, num_expert_workers=2, num_cpus_per_worker=0.1,
                              attention_resources={"moe_attention": 1}, expert_resources={"moe_expert": 1})
    engine, group = build(demo_model_dir, topology, step_timeout_s=20.0,
                          recovery=RecoveryPolicy(max_recoveries=5, timeout_s=30.0))
    by_id = {n.node_id: name for name, n in nodes.items()}

    def node_of() -> dict[int, str]:
        return {w["rank"]: by_id[w["node_id"]] for w in group.where()}

    def remove_node_of(rank: int):
        return lambda: cl.remove_node(nodes[node_of()[rank]], allow_graceful=False)

    async def both_phases():
        before = node_of()
        assert before[0] == "attention" and {before[1], before[2]} < {"expert_a", "expert_b", "expert_spare"}
        recovered = await run_requests(engine, prompts(), fault=remove_node_of(1))
        await grown_back(group)
        after = node_of()
        # No attention node left after this one: that loss cannot be recovered.
        t0 = time.monotonic()
        # Long requests: the node loss takes a moment to reach the engine, and every request must
        # still be running when it does (short ones could finish with "length" first).
        failed = await run_requests(engine, prompts()[:10], fault=remove_node_of(0), fault_after=10 * 4,
                                    params=LONG)
        return before, recovered, after, failed, time.monotonic() - t0

    try:
        before, got, after, failed, failed_after_s = run(engine, both_phases())
        assert [r["finish_reason"] for r in got["results"]] == ["length"] * NUM_REQUESTS
        assert got["tokens"] == reference
        assert got["events"][0].fault.rank == 1 and got["events"][-1].outcome == "recovered"
        assert got["events"][0].repair == "expert_worker" and got["events"][0].num_requeued == 0
        # The survivor moved up to rank 1; the new worker (rank 2) runs on the node that was spare (Ray
        # may have put the first two on any two of the three expert nodes).
        assert (after[0], after[1]) == ("attention", before[2])
        assert after[2] not in (before[1], before[2]) and after[2].startswith("expert_")

        for r in failed["results"]:
            assert r["finish_reason"] == "error" and "engine unavailable" in r["error"]
        assert failed["events"][-1].outcome == "failed" and not engine.healthy
        assert failed_after_s < RUN_DEADLINE_S
    finally:
        group.shutdown()
