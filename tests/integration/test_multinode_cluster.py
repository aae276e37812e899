"""A model group spread over a three-node `ray.cluster_utils.Cluster`.

All nodes of a cluster_utils.Cluster share one IP, so nodes are told apart by custom
resources: one node advertises `moe_attention`, two advertise `moe_expert`, and the
topology steers each kind of worker to its pool.
"""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.distributed_engine import build_distributed_engine
from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from cluster.topology import TopologyConfig
from tests.engine_helpers import run_requests
from tests.model_helpers import save_hf_mixtral
from workers.model.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def three_nodes():
    # ray.init(address="127.0.0.1:port") rewrites a loopback host to the machine's outward
    # address; these tests must stay on loopback, so keep the address as given.
    mp = pytest.MonkeyPatch()
    mp.setattr(ray._private.services, "resolve_ip_for_localhost", lambda host: host)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "resources": {"head": 1},
        "include_dashboard": False})
    nodes = {
        "attention": cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                                      resources={"moe_attention": 2}),
        "expert_a": cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"moe_expert": 1}),
        "expert_b": cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"moe_expert": 1}),
    }
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()
    mp.undo()


def test_experts_run_on_other_nodes_than_attention(three_nodes, tmp_path):
    cluster, nodes = three_nodes
    save_hf_mixtral(tmp_path, num_hidden_layers=2, max_position_embeddings=256)
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_kv_blocks=64)
    topo = TopologyConfig(num_attention_workers=1, num_expert_workers=2, strategy="SPREAD",
                          num_cpus_per_worker=0.1, attention_resources={"moe_attention": 1},
                          expert_resources={"moe_expert": 1})
    engine, group = build_distributed_engine(tmp_path, cfg, topo)
    try:
        where = group.where()
        node_of = {info["rank"]: info["node_id"] for info in where}
        assert node_of[0] == nodes["attention"].node_id
        assert {node_of[1], node_of[2]} == {nodes["expert_a"].node_id, nodes["expert_b"].node_id}
        reqs = [([5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), 0),
                (list(range(3, 40)), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), 1)]
        got = run_requests(engine, reqs)
    finally:
        group.shutdown()
    want = run_requests(build_local_engine(tmp_path, cfg), reqs)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
