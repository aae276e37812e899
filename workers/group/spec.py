"""What every worker of a model group is told when it starts (crosses the actor boundary)."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.device.selection import DEVICE_CHOICES
from workers.model.cache_config import CacheConfig
from workers.moe.expert_map import ExpertMap


@dataclass(frozen=True)
class GroupSpec:
    model_dir: str
    expert_map: ExpertMap  # ranks [0, A) attention, [A, A+X) experts
    num_attention_workers: int
    cache: CacheConfig = field(default_factory=CacheConfig)
    device: str = "auto"  # each worker resolves it once at start (workers/device/selection.py)
    dtype: str = "auto"  # "auto": the checkpoint's torch_dtype on a GPU, float32 on a CPU
    gpu_fraction: float = 1.0  # of a GPU each worker was given: its share of that GPU's memory
    capacity_factor: float | None = None  # None: dropless
    num_threads: int = 1  # torch intra-op threads per worker
    collective_timeout_s: float = 120.0
    placement_version: int = 0  # of expert_map: a worker started after a placement change starts on it

    def __post_init__(self) -> None:
        if self.expert_map.world_size <= self.num_attention_workers:
            raise ValueError("a model group needs at least one expert worker")
        if tuple(self.expert_map.expert_ranks) != tuple(range(self.num_attention_workers,
                                                             self.expert_map.world_size)):
            raise ValueError("expert ranks must follow the attention ranks")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        if not 0 < self.gpu_fraction <= 1:
            raise ValueError(f"gpu_fraction must be in (0, 1], got {self.gpu_fraction}")

    @property
    def world_size(self) -> int:
        return self.expert_map.world_size
