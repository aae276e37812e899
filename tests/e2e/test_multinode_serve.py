"""The whole gateway on a three-node `ray.cluster_utils.Cluster`.

Serve's proxy and the engine replica share the head node; the attention worker runs on a
node advertising `moe_attention` and the two expert workers on two `moe_expert` nodes.
A completion through the OpenAI client equals the in-process engine's greedy output.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from cluster.tokenizer import Tokenizer
from tests.e2e.conftest import free_port, run_app
from workers.model.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def served_on_three_nodes(demo_model_dir):
    from gateway.app import ServeOptions

    mp = pytest.MonkeyPatch()
    # Ray rewrites a loopback address given to ray.init to the machine's outward one; stay on loopback.
    mp.setattr(ray._private.services, "resolve_ip_for_localhost", lambda host: host)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    nodes = {
        "attention": cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1",
                                      resources={"moe_attention": 1}),
        "expert_a": cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"moe_expert": 1}),
        "expert_b": cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"moe_expert": 1}),
    }
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    cluster.wait_for_nodes()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = ServeOptions(model_dir=str(demo_model_dir), model_name="demo-multinode",
                           num_attention_workers=1, num_expert_workers=2, num_cpus_per_worker=0.1,
                           max_num_seqs=8, num_kv_blocks=128,
                           placement_strategy="SPREAD", attention_resources={"moe_attention": 1},
                           expert_resources={"moe_expert": 1})
    server = run_app(f"http://127.0.0.1:{port}", options, "multinode", "/")
    yield server, nodes
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    mp.undo()


def test_completion_across_nodes_equals_in_process_engine(served_on_three_nodes, demo_model_dir):
    server, nodes = served_on_three_nodes
    # Where did the workers go? The GCS actor table knows each actor's node (the state API
    # would need the dashboard, which tests do not start).
    by_class: dict[str, list[str]] = {}
    for info in ray._private.state.actors().values():
        if info["State"] == "ALIVE":
            by_class.setdefault(info["ActorClassName"].split(".")[-1], []).append(info["Address"]["NodeID"])
    assert by_class["AttentionWorker"] == [nodes["attention"].node_id]
    assert sorted(by_class["ExpertWorker"]) == sorted([nodes["expert_a"].node_id, nodes["expert_b"].node_id])

    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    prompt = "The cluster spans three nodes and"
    got = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=12, temperature=0.0)

    tok = Tokenizer.from_dir(demo_model_dir)
    engine = build_local_engine(demo_model_dir, EngineConfig(max_num_seqs=4, num_kv_blocks=64))

    async def reference():
        text = "".join([o.text async for o in engine.generate(
            "ref", tok.encode(prompt), SamplingParams(max_tokens=12, temperature=0.0))])
        await engine.shutdown()
        return text

    assert got.choices[0].text == asyncio.run(reference())
    assert got.usage.completion_tokens == 12 or got.choices[0].finish_reason == "stop"
