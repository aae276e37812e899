"""Driver for tests/integration/test_multihost.py, run inside the head's network namespace.

    python -m tests.integration.multihost_driver --address 198.18.0.1:6379 --model-dir DIR --nodes 3

Joins the running Ray cluster, waits for `--nodes` alive nodes, builds the distributed engine
(1 attention worker on the `moe_attention` node, 2 expert workers SPREAD over the
`moe_expert` nodes), runs `requests()` greedily and prints one line:

    MULTIHOST_RESULT {"rendezvous": [addr, port], "where": [...], "dispatch_stats": [...],
                      "nodes": [...], "outputs": [...]}

The requests and the engine configuration live here so the test runs the very same ones
through the single-process engine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cluster.engine_config import EngineConfig
from cluster.topology import TopologyConfig
from workers.model.sampling_params import SamplingParams

RESULT_PREFIX = "MULTIHOST_RESULT "
VOCAB = 101


def engine_cfg() -> EngineConfig:
    return EngineConfig(max_num_seqs=8, max_num_batched_tokens=32, block_size=4, num_kv_blocks=64,
                        num_attention_workers=1)


def topology() -> TopologyConfig:
    return TopologyConfig(num_attention_workers=1, num_expert_workers=2, strategy="SPREAD",
                          num_cpus_per_worker=0.1, attention_resources={"moe_attention": 1},
                          expert_resources={"moe_expert": 1})


def requests() -> list[tuple[list[int], SamplingParams, int]]:
    """A few greedy requests; one is longer than a prefill chunk."""
    greedy = dict(temperature=0.0, ignore_eos=True, logprobs=True)
    return [
        ([5, 17, 42, 8, 99, 3], SamplingParams(max_tokens=6, **greedy), 0),
        ([60, 61, 62], SamplingParams(max_tokens=4, **greedy), 0),
        (list(range(3, 50)), SamplingParams(max_tokens=3, **greedy), 1),
    ]


def wait_for_nodes(n: int, timeout_s: float) -> list[dict]:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [nd for nd in ray.nodes() if nd["Alive"]]
        if len(alive) >= n:
            return alive
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(alive)} of {n} Ray nodes alive after {timeout_s:.0f}s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True, help="the head's GCS address, host:port")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for nodes and workers")
    args = p.parse_args(argv)

    import ray

    from cluster.distributed_engine import build_distributed_engine
    from cluster.fault_config import FaultConfig
    from tests.engine_helpers import run_requests

    ray.init(address=args.address, configure_logging=False, log_to_driver=False)
    try:
        nodes = wait_for_nodes(args.nodes, args.timeout)
        engine, group = build_distributed_engine(args.model_dir, engine_cfg(), topology(),
                                                 faults=FaultConfig(collective_timeout_s=args.timeout))
        try:
            where = group.where()
            outputs = run_requests(engine, requests())
            stats = [{"rows_received": sum(st.dispatch.tokens_per_expert.values()),
                      "dispatch_bytes_received": st.dispatch.dispatch_bytes_received,
                      "combine_bytes_sent": st.dispatch.combine_bytes_sent} for st in group.dispatch_stats()]
        finally:
            group.shutdown()
        result = {
            "rendezvous": list(group.rendezvous),
            "where": where,
            "dispatch_stats": stats,  # per rank
            "nodes": [{"node_id": nd["NodeID"], "address": nd["NodeManagerAddress"],
                       "resources": nd["Resources"]} for nd in nodes],
            "outputs": [{"token_ids": o["token_ids"], "logprobs": o["logprobs"]} for o in outputs],
        }
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
