"""Build the engine over a Ray worker group: the same Engine, a different executor."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cluster.engine import Engine
from cluster.engine_config import EngineConfig
from cluster.placement import place_experts
from cluster.recovery_policy import RecoveryPolicy
from cluster.text_io import load_text_io
from cluster.topology import TopologyConfig
from cluster.worker_group import DEFAULT_STEP_TIMEOUT_S, GroupPlacement, RayWorkerGroup
from workers.config import ModelConfig
from workers.group_spec import GroupSpec


@dataclass(frozen=True)
class ExpertParallelConfig:
    expert_replicas: Mapping[tuple[int, int], int] = field(default_factory=dict)  # (layer, expert) → copies
    capacity_factor: float | None = None  # None: dropless (exact)
    device: str = "auto"  # each worker's: auto | cpu | cuda (workers/device.py)
    dtype: str = "auto"  # "auto": the checkpoint's torch_dtype on a GPU, float32 on a CPU
    num_threads: int = 1
    collective_timeout_s: float = 120.0  # gloo/nccl: a collective with a dead peer errors after this
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S  # the watchdog: a step taking longer is a stalled worker
    recovery: RecoveryPolicy = field(default_factory=RecoveryPolicy)

    def __post_init__(self) -> None:
        if self.step_timeout_s <= 0 or self.collective_timeout_s <= 0:
            raise ValueError("step_timeout_s and collective_timeout_s must be > 0")


def build_group_spec(model_dir: str | Path, engine_cfg: EngineConfig, topology: TopologyConfig,
                     ep: ExpertParallelConfig) -> GroupSpec:
    cfg = ModelConfig.from_dir(model_dir)
    placement = place_experts(cfg.num_hidden_layers, cfg.num_local_experts, topology.num_expert_workers,
                              replicas=dict(ep.expert_replicas) or None)
    return GroupSpec(
        model_dir=str(Path(model_dir).resolve()),
        expert_map=placement.to_expert_map(topology.num_attention_workers),
        num_attention_workers=topology.num_attention_workers, cache=engine_cfg.cache_config(),
        device=ep.device, dtype=ep.dtype, gpu_fraction=topology.gpu_fraction,
        capacity_factor=ep.capacity_factor, num_threads=ep.num_threads,
        collective_timeout_s=ep.collective_timeout_s,
    )


def build_distributed_engine(model_dir: str | Path, engine_cfg: EngineConfig, topology: TopologyConfig,
                             ep: ExpertParallelConfig | None = None,
                             placement: GroupPlacement | None = None) -> tuple[Engine, RayWorkerGroup]:
    ep = ep or ExpertParallelConfig()
    if engine_cfg.num_attention_workers != topology.num_attention_workers:
        raise ValueError("engine config and topology disagree on the number of attention workers")
    spec = build_group_spec(model_dir, engine_cfg, topology, ep)
    group = RayWorkerGroup(spec, topology, placement, step_timeout_s=ep.step_timeout_s)
    cfg = ModelConfig.from_dir(model_dir)
    tokenizer, eos = load_text_io(model_dir, cfg)
    # Every attention worker's cache has the same number of blocks unless their devices differ;
    # the schedulers share one count, so the smallest is the one all can honour.
    memory = group.memory_reports()
    engine_cfg = dataclasses.replace(engine_cfg, num_kv_blocks=min(m.num_kv_blocks for m in memory))
    engine = Engine(group, engine_cfg, max_model_len=cfg.max_position_embeddings, eos_token_ids=eos,
                    tokenizer=tokenizer, recovery=ep.recovery, memory=memory)
    return engine, group
