"""The step channel on a real model group across two simulated nodes (cluster/step_broadcast.py).

The engine (this driver) runs on the head node, which also holds the attention worker: it
reads its steps from the shared-memory ring; both expert workers sit on a second node and get
theirs over TCP. Both control paths run on the same workers and must equal the single-process
engine; a step that raises in a worker's loop, and an expert on the other node killed, are
named as today's Ray-call path names them, and the restarted group serves through new loops.
Nodes are told apart by custom resources (see test_multinode_cluster.py).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.distributed_engine import build_distributed_engine
from cluster.engine import Engine
from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from cluster.topology import TopologyConfig
from cluster.worker_fault import WorkerFailed
from tests.engine_helpers import run_requests
from tests.model_helpers import save_hf_mixtral
from workers.model.batch_spec import ScheduledBatch, ScheduledSeq
from workers.model.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)
ENGINE_CFG = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_kv_blocks=64)
REQUESTS = [([5, 6, 7, 8], GREEDY, 0), (list(range(3, 40)), GREEDY, 1), ([9, 10], GREEDY, 0)]


@pytest.fixture(scope="module")
def two_nodes():
    mp = pytest.MonkeyPatch()
    mp.setattr(ray._private.services, "resolve_ip_for_localhost", lambda host: host)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "resources": {"moe_attention": 1},
        "include_dashboard": False})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources={"moe_expert": 2})
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("channel_model")
    save_hf_mixtral(out, num_hidden_layers=2, max_position_embeddings=256)
    return out


@pytest.fixture(scope="module")
def built(two_nodes, model_dir):
    topo = TopologyConfig(num_attention_workers=1, num_expert_workers=2, num_cpus_per_worker=0.1,
                          attention_resources={"moe_attention": 0.5}, expert_resources={"moe_expert": 0.5})
    engine, group = build_distributed_engine(model_dir, ENGINE_CFG, topo)
    yield engine, group
    group.shutdown()


class OverRayCalls:
    """The same group, stepped by the reference path: one Ray call per worker per step."""

    def __init__(self, group) -> None:
        self.group = group
        self.num_attention_workers = group.num_attention_workers

    async def execute(self, batches):
        return await self.group.execute_over_ray(batches)

    async def recover(self, fault, timeout_s):
        return await self.group.recover(fault, timeout_s)


def assert_routes(group) -> None:
    """The attention worker shares the engine's node: ring; the experts do not: TCP."""
    engine_node = ray.get_runtime_context().get_node_id()
    nodes = {w["rank"]: w["node_id"] for w in group.where()}
    assert nodes[0] == engine_node and nodes[1] != engine_node and nodes[2] != engine_node
    assert group.control == "channel" and group.loops.broadcast.vias == ("ring", "tcp", "tcp")


def test_both_control_paths_equal_the_single_process_engine(built, model_dir):
    engine, group = built
    assert_routes(group)
    over_channel = run_requests(engine, REQUESTS)
    over_ray = run_requests(Engine(OverRayCalls(group), ENGINE_CFG, max_model_len=engine.max_model_len,
                                   eos_token_ids=engine.eos_token_ids), REQUESTS)
    want = run_requests(build_local_engine(model_dir, ENGINE_CFG), REQUESTS)
    for path in (over_channel, over_ray):
        assert [g["token_ids"] for g in path] == [w["token_ids"] for w in want]
        for g, w in zip(path, want, strict=True):
            assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
    assert group.loops.broadcast.seq > 0  # the channel ran the first engine's steps


def bad_step() -> tuple[ScheduledBatch, ...]:
    """A token id past the vocabulary: the attention worker's embedding raises inside its loop."""
    return (ScheduledBatch((ScheduledSeq(0, (10_000,), 0, (0,), True, GREEDY, 0),)),)


def good_step() -> tuple[ScheduledBatch, ...]:
    return (ScheduledBatch((ScheduledSeq(0, (5, 6, 7), 0, (0,), True, GREEDY, 0),)),)


def test_a_step_that_raises_in_a_loop_is_a_collective_error_then_the_group_serves_again(built):
    _, group = built
    want = asyncio.run(group.execute_over_ray(good_step()))

    async def fail_then_recover():
        with pytest.raises(WorkerFailed) as failed:
            await group.execute(bad_step())
        repair = await group.recover(failed.value.fault, timeout_s=120)
        return failed.value.fault, repair.restarted_kinds, await group.execute(good_step())

    fault, kinds, again = asyncio.run(fail_then_recover())
    assert (fault.cause, fault.rank, fault.kind) == ("collective_error", 0, "attention")
    assert "IndexError" in fault.detail and "WorkerStepError" in fault.detail
    assert kinds == ("attention", "expert", "expert")
    assert again == want  # through the restarted group's new loops
    assert_routes(group)
    assert group.loops.broadcast.seq == 1


def test_an_expert_killed_on_the_other_node_is_named_dead(built):
    _, group = built
    want = asyncio.run(group.execute(good_step()))
    (info,) = [w for w in group.where() if w["rank"] == 1]
    os.kill(info["pid"], signal.SIGKILL)

    async def fail_then_recover():
        with pytest.raises(WorkerFailed) as failed:
            await group.execute(good_step())
        repair = await group.recover(failed.value.fault, timeout_s=120)
        shrunk = await group.execute(good_step())  # the survivor holds every expert now
        await asyncio.gather(*group.background)  # a new expert worker joins in the background
        return failed.value.fault, repair, shrunk, await group.execute(good_step())

    fault, repair, shrunk, again = asyncio.run(fail_then_recover())
    assert (fault.cause, fault.rank, fault.kind) == ("died", 1, "expert")
    assert repair.kind == "expert_worker" and shrunk == want
    assert fault.actor_id and fault.node_id
    assert again == want
    assert_routes(group)


def test_a_group_whose_channel_cannot_be_set_up_steps_over_ray_calls(two_nodes, model_dir, monkeypatch,
                                                                    caplog):
    from cluster.step_broadcast import StepRing

    def no_shared_memory(*_args, **_kwargs):
        raise OSError("no shared memory here")

    monkeypatch.setattr(StepRing, "create", no_shared_memory)
    topo = TopologyConfig(num_attention_workers=1, num_expert_workers=2, num_cpus_per_worker=0.1,
                          attention_resources={"moe_attention": 0.5}, expert_resources={"moe_expert": 0.5})
    engine, group = build_distributed_engine(model_dir, ENGINE_CFG, topo)
    try:
        assert group.control == "ray" and group.loops is None
        assert "no shared memory here" in caplog.text
        got = run_requests(engine, REQUESTS[:1])
    finally:
        group.shutdown()
    want = run_requests(build_local_engine(model_dir, ENGINE_CFG), REQUESTS[:1])
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
