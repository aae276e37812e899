"""What every worker of a model group is told when it starts (crosses the actor boundary)."""

from __future__ import annotations

from dataclasses import dataclass

from workers.expert_map import ExpertMap


@dataclass(frozen=True)
class GroupSpec:
    model_dir: str
    dtype: str  # "float32" | "bfloat16" | "float16" | "auto"
    expert_map: ExpertMap  # ranks [0, A) attention, [A, A+X) experts
    num_attention_workers: int
    num_kv_blocks: int
    block_size: int
    capacity_factor: float | None = None  # None: dropless
    backend: str | None = None  # None: nccl with CUDA, else gloo
    num_threads: int = 1  # torch intra-op threads per worker
    collective_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.expert_map.world_size <= self.num_attention_workers:
            raise ValueError("a model group needs at least one expert worker")
        if tuple(self.expert_map.expert_ranks) != tuple(range(self.num_attention_workers,
                                                             self.expert_map.world_size)):
            raise ValueError("expert ranks must follow the attention ranks")

    @property
    def world_size(self) -> int:
        return self.expert_map.world_size
