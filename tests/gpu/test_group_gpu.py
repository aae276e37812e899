"""An expert-parallel Ray group on one shared GPU: 1 attention + 2 expert workers, a quarter GPU each.

NCCL refuses two ranks on one device, so the group must pick the "staged" backend (gloo, rows
through pinned host memory). The oracle is the single-process engine on the same GPU (fp32, TF32
off): the same greedy ids for a workload with arrivals every step, and, with an expert worker
SIGKILLed under load, every request still ends with the fault-free run's ids
(tests/integration/test_fault_recovery.py's helpers and checks, on CUDA).
"""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest

from cluster.distributed_engine import build_distributed_engine
from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from cluster.topology import TopologyConfig
from cluster.worker_config import WorkerConfig
from tests.engine_helpers import run_requests
from tests.integration import test_engine as engine_cases

pytestmark = pytest.mark.gpu

GPUS_PER_WORKER = 0.25
CUDA_FP32 = dict(device="cuda", dtype="float32")


def shared_gpu_topology() -> TopologyConfig:
    return TopologyConfig(num_attention_workers=1, num_expert_workers=2, num_cpus_per_worker=0.5,
                          num_gpus_per_worker=GPUS_PER_WORKER)


@pytest.fixture(scope="module")
def fault_cases(ray_on_gpu):
    """test_fault_recovery.py imports Ray at its top: imported once Ray is known to be there."""
    from tests.integration import test_fault_recovery

    return test_fault_recovery


def sigkill(pid: int):
    return lambda: os.kill(pid, signal.SIGKILL)


def assert_on_one_shared_gpu(group) -> None:
    import ray

    assert group.backend == "staged"
    assert {w["device"] for w in group.where()} == {"cuda:0"}
    gpu_ids = ray.get([w.__ray_call__.remote(lambda _w: tuple(ray.get_gpu_ids())) for w in group.workers])
    assert len(set(gpu_ids)) == 1 and len(gpu_ids[0]) == 1, gpu_ids  # one physical GPU, shared


def test_group_sharing_one_gpu_equals_single_process_engine(cuda_device, ray_on_gpu, demo_model_dir):
    reqs = engine_cases.workload(16, seed=2)
    config = EngineConfig(**engine_cases.BASE)
    local_engine = build_local_engine(demo_model_dir, config, dtype="float32", device=cuda_device)
    local = run_requests(local_engine, reqs)
    engine, group = build_distributed_engine(demo_model_dir, config, shared_gpu_topology(),
                                             worker=WorkerConfig(**CUDA_FP32))
    try:
        assert_on_one_shared_gpu(group)
        distributed = run_requests(engine, reqs)
    finally:
        group.shutdown()
    assert [r["token_ids"] for r in distributed] == [r["token_ids"] for r in local]
    assert [len(r["token_ids"]) for r in local] == [params.max_tokens for _, params, _ in reqs]


def test_sigkill_expert_worker_under_load_on_gpu(cuda_device, ray_on_gpu, fault_cases, demo_model_dir):
    fc = fault_cases
    reference_engine = build_local_engine(demo_model_dir, fc.ENGINE_CFG, dtype="float32", device=cuda_device)
    reference = fc.run(reference_engine, fc._run(reference_engine, fc.prompts()))["tokens"]
    topology = shared_gpu_topology()
    config = dataclasses.replace(fc.ENGINE_CFG, num_attention_workers=topology.num_attention_workers)
    engine, group = build_distributed_engine(demo_model_dir, config, topology,
                                             worker=WorkerConfig(**CUDA_FP32))
    try:
        victim = fc.pid_of(group, 2)
        # The second run shows the group keeps serving after the recovery.
        got, again = fc.run(engine, fc._run(engine, fc.prompts(), fault=sigkill(victim)),
                            fc._run(engine, fc.prompts()[:5]))
        fc.assert_recovered(got, reference, rank=2, kind="expert", cause="died")
        assert fc.pid_of(group, 2) != victim
        assert_on_one_shared_gpu(group)  # the restarted worker took its quarter of the same GPU
        assert again["tokens"] == reference[:5] and not again["events"]
    finally:
        group.shutdown()
