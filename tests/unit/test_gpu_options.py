"""GPU flags and options: what `moe-serve serve` reserves and refuses, without a GPU."""

from __future__ import annotations

import pytest

from gateway.app import ServeOptions, replica_bundle, resource_demand
from gateway.cli import build_parser, gpus_per_worker


def options(**fields) -> ServeOptions:
    return ServeOptions(model_dir="/nonexistent/demo", **fields)


def test_gpus_flag_is_one_gpu_per_worker_and_fractions_share_one():
    parse = build_parser().parse_args
    assert gpus_per_worker(parse(["serve", "--gpus"])) == 1.0
    assert gpus_per_worker(parse(["serve", "--gpus-per-worker", "0.25"])) == 0.25
    assert gpus_per_worker(parse(["serve"])) == 0.0
    with pytest.raises(ValueError, match="not both"):
        gpus_per_worker(parse(["serve", "--gpus", "--gpus-per-worker", "0.5"]))


def test_defaults_are_auto():
    args = build_parser().parse_args(["serve"])
    assert (args.device, args.dtype, args.gpu_memory_utilization) == ("auto", "auto", 0.9)
    o = options()
    assert (o.device, o.dtype, o.num_kv_blocks) == ("auto", "auto", None)


def test_cuda_without_reserved_gpus_is_refused_at_once():
    with pytest.raises(ValueError, match="needs GPUs reserved.*--gpus"):
        options(device="cuda")
    options(device="cuda", num_gpus_per_worker=1.0)


@pytest.mark.parametrize("fields, words", [
    (dict(device="tpu"), "device must be one of"),
    (dict(num_gpus_per_worker=2.0), r"num_gpus_per_worker must be in \[0, 1\]"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
    (dict(num_kv_blocks=0), "num_kv_blocks"),
])
def test_bad_gpu_options_are_refused(fields, words):
    with pytest.raises(ValueError, match=words):
        options(**fields)


def test_a_single_process_replica_reserves_the_gpu_itself():
    alone = options(num_expert_workers=0, num_gpus_per_worker=1.0)
    assert replica_bundle(alone) == {"CPU": 0.25, "GPU": 1.0}
    assert replica_bundle(alone, ray_actor_options=True) == {"num_cpus": 0.25, "num_gpus": 1.0}
    grouped = options(num_expert_workers=2, num_gpus_per_worker=1.0)
    assert replica_bundle(grouped) == {"CPU": 0.25}  # its workers hold the GPUs


def test_resource_demand_counts_every_worker_of_every_group():
    o = options(num_attention_workers=1, num_expert_workers=3, num_gpus_per_worker=0.25,
                num_engine_replicas=2)
    demand = resource_demand(o)
    assert sum(b.get("GPU", 0) for b in demand) == 2 * 4 * 0.25
    assert len(demand) == 1 + 2 * (1 + 4)  # ingress, then each replica and its 4 workers


def test_topology_carries_the_gpu_share():
    topo = options(num_gpus_per_worker=0.25).topology()
    assert topo.num_gpus_per_worker == 0.25 and topo.gpu_fraction == 0.25
    assert options().topology().gpu_fraction == 1.0  # CPU workers: the fraction is moot
