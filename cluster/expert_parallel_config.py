"""How a model group spreads the experts over its expert workers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertParallelConfig:
    expert_replicas: Mapping[tuple[int, int], int] = field(default_factory=dict)  # (layer, expert) → copies
    capacity_factor: float | None = None  # None: dropless (exact)
