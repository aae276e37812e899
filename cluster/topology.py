"""Where a model group's workers run: placement-group bundles, pure and testable.

A model group is A attention workers and X expert workers. Each gets one bundle (one GPU
in production); custom resources can steer attention and expert workers to different
node pools (e.g. KubeRay worker groups advertising `{"moe_attention": 1}` and
`{"moe_expert": 1}`). PACK keeps a group on as few nodes as possible (cheap collectives);
SPREAD puts workers on different nodes where it can (fault isolation, more GPUs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class TopologyConfig:
    num_attention_workers: int = 1
    num_expert_workers: int = 2
    strategy: str = "PACK"
    # GPUs each worker reserves: 1 in production; a fraction lets several workers share a GPU
    # (0.25: one attention + three expert workers on a one-GPU box). 0: CPU only.
    num_gpus_per_worker: float = 0.0
    num_cpus_per_worker: float = 0.25  # fractional: a 2-core laptop still fits a whole group
    attention_resources: Mapping[str, float] = field(default_factory=dict)
    expert_resources: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_attention_workers < 1:
            raise ValueError(f"num_attention_workers must be >= 1, got {self.num_attention_workers}")
        if self.num_expert_workers < 1:
            raise ValueError(f"num_expert_workers must be >= 1, got {self.num_expert_workers}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.num_cpus_per_worker < 0:
            raise ValueError("num_cpus_per_worker must be >= 0")
        if not 0 <= self.num_gpus_per_worker <= 1:
            raise ValueError(f"num_gpus_per_worker must be in [0, 1] (a worker uses one GPU at most), "
                             f"got {self.num_gpus_per_worker}")

    @property
    def gpu_fraction(self) -> float:
        """Each worker's share of its GPU's memory."""
        return self.num_gpus_per_worker or 1.0

    @property
    def world_size(self) -> int:
        return self.num_attention_workers + self.num_expert_workers

    def rank_kind(self, rank: int) -> str:
        """Ranks 0..A-1 are attention workers, A..A+X-1 expert workers."""
        return "attention" if rank < self.num_attention_workers else "expert"


def worker_bundle(cfg: TopologyConfig, kind: str) -> dict[str, float]:
    bundle: dict[str, float] = {}
    if cfg.num_cpus_per_worker:
        bundle["CPU"] = cfg.num_cpus_per_worker
    if cfg.num_gpus_per_worker:
        bundle["GPU"] = cfg.num_gpus_per_worker
    extra = cfg.attention_resources if kind == "attention" else cfg.expert_resources
    bundle.update(extra)
    # Ray rejects empty bundles; a sliver of CPU keeps a resource-free worker placeable.
    return bundle or {"CPU": 0.001}


def worker_bundles(cfg: TopologyConfig) -> list[dict[str, float]]:
    """One bundle per rank, in rank order."""
    return [worker_bundle(cfg, cfg.rank_kind(r)) for r in range(cfg.world_size)]
