"""Build the engine over a Ray model group: the same Engine, the Ray executor."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cluster.engine import Engine
from cluster.engine_config import EngineConfig
from cluster.expert_parallel_config import ExpertParallelConfig
from cluster.fault_config import FaultConfig
from cluster.placement import place_experts
from cluster.ray_executor import RayExecutor
from cluster.reservation import Reservation
from cluster.text_io import load_text_io
from cluster.topology import TopologyConfig
from cluster.worker_config import WorkerConfig
from workers.group.spec import GroupSpec
from workers.weights.config import ModelConfig


def build_group_spec(model_dir: str | Path, model_config: ModelConfig, engine_cfg: EngineConfig,
                     topology: TopologyConfig, *, expert_parallel: ExpertParallelConfig | None = None,
                     worker: WorkerConfig | None = None, faults: FaultConfig | None = None) -> GroupSpec:
    """What every worker of the group is told at start (it reads its own ModelConfig there)."""
    expert_parallel = expert_parallel or ExpertParallelConfig()
    worker = worker or WorkerConfig()
    faults = faults or FaultConfig()
    placement = place_experts(model_config.num_hidden_layers, model_config.num_local_experts,
                              topology.num_expert_workers,
                              replicas=dict(expert_parallel.expert_replicas) or None)
    return GroupSpec(
        model_dir=str(Path(model_dir).resolve()),
        expert_map=placement.to_expert_map(topology.num_attention_workers),
        num_attention_workers=topology.num_attention_workers, cache=engine_cfg.cache_config(),
        device=worker.device, dtype=worker.dtype, gpu_fraction=topology.gpu_fraction,
        capacity_factor=expert_parallel.capacity_factor, num_threads=worker.num_threads,
        collective_timeout_s=faults.collective_timeout_s,
    )


def build_distributed_engine(model_dir: str | Path, engine_cfg: EngineConfig, topology: TopologyConfig, *,
                             expert_parallel: ExpertParallelConfig | None = None,
                             worker: WorkerConfig | None = None, faults: FaultConfig | None = None,
                             reservation: Reservation | None = None,
                             model_config: ModelConfig | None = None) -> tuple[Engine, RayExecutor]:
    """`model_config`: the caller's, read once (an engine replica's); None reads model_dir's."""
    if engine_cfg.num_attention_workers != topology.num_attention_workers:
        raise ValueError("engine config and topology disagree on the number of attention workers")
    faults = faults or FaultConfig()
    model_config = model_config or ModelConfig.from_dir(model_dir)
    spec = build_group_spec(model_dir, model_config, engine_cfg, topology, expert_parallel=expert_parallel,
                            worker=worker, faults=faults)
    executor = RayExecutor(spec, topology, reservation, step_timeout_s=faults.step_timeout_s)
    tokenizer, eos = load_text_io(model_dir, model_config)
    # Every attention worker's cache has the same number of blocks unless their devices differ;
    # the schedulers share one count, so the smallest is the one all can honour.
    memory = executor.memory_reports()
    engine_cfg = dataclasses.replace(engine_cfg, num_kv_blocks=min(m.num_kv_blocks for m in memory))
    if expert_parallel is not None and expert_parallel.capacity_factor is not None:
        # Low-latency buffers are dropless by construction; a capacity factor needs the exact path.
        engine_cfg = dataclasses.replace(engine_cfg, low_latency_max_tokens=0)
    executor.graphs.configure(engine_cfg)  # the workers capture once the first step is done
    engine = Engine(executor, engine_cfg, max_model_len=model_config.max_position_embeddings,
                    eos_token_ids=eos, tokenizer=tokenizer, recovery_policy=faults.recovery,
                    memory=memory)
    return engine, executor
