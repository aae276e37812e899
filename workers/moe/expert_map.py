"""The routing table every rank of a model group receives: which rank holds which expert.

A placement (cluster/placement.py) produces it; dispatch reads it. Ranks are process-group
ranks: attention ranks hold tokens, expert ranks hold experts (a rank may in principle be
both). On each rank, the experts of one layer are stacked in ascending id order (as
`LayerExperts.stack` does), so an expert's *local slot* is its index in that tuple.

A replicated expert has one (rank, slot) per copy, on distinct ranks, in ascending rank
order; dispatch splits its tokens between them.

Plain Python (no torch): it is pickled to every actor and built by the control plane.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

Replica = tuple[int, int]  # (rank, local slot)


@dataclass(frozen=True)
class ExpertMap:
    world_size: int
    num_experts: int  # per layer
    expert_ranks: tuple[int, ...]  # ascending
    local_expert_ids: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][rank] → expert ids, ascending

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}")
        if list(self.expert_ranks) != sorted(set(self.expert_ranks)) or not all(
                0 <= r < self.world_size for r in self.expert_ranks):
            raise ValueError(f"expert_ranks must be distinct, ascending ranks < {self.world_size}: "
                             f"{self.expert_ranks}")
        if not self.local_expert_ids:
            raise ValueError("an expert map needs at least one layer")
        for layer, by_rank in enumerate(self.local_expert_ids):
            if len(by_rank) != self.world_size:
                raise ValueError(f"layer {layer}: {len(by_rank)} ranks listed, "
                                 f"world size is {self.world_size}")
            held: set[int] = set()
            for rank, ids in enumerate(by_rank):
                if list(ids) != sorted(set(ids)) or not all(0 <= e < self.num_experts for e in ids):
                    raise ValueError(f"layer {layer} rank {rank}: local experts must be distinct, ascending "
                                     f"ids < {self.num_experts}, got {ids}")
                if ids and rank not in self.expert_ranks:
                    raise ValueError(f"layer {layer}: rank {rank} holds experts {ids} "
                                     "but is not an expert rank")
                held.update(ids)
            missing = sorted(set(range(self.num_experts)) - held)
            if missing:
                raise ValueError(f"layer {layer}: experts {missing} are on no rank")

    @property
    def num_layers(self) -> int:
        return len(self.local_expert_ids)

    @property
    def attention_ranks(self) -> tuple[int, ...]:
        return tuple(r for r in range(self.world_size) if r not in self.expert_ranks)

    def check_holds(self, rank: int, expert_ids_by_layer: Mapping[int, tuple[int, ...]]) -> None:
        """Raise unless `rank` was given exactly the experts this map puts on it, layer by layer."""
        extra = sorted(set(expert_ids_by_layer) - set(range(self.num_layers)))
        if extra:
            raise ValueError(f"experts given for layers {extra}, the expert map has {self.num_layers}")
        for layer in range(self.num_layers):
            want, got = self.local_experts(layer, rank), tuple(expert_ids_by_layer.get(layer, ()))
            if got != want:
                raise ValueError(f"layer {layer}: rank {rank} should hold experts {want}, was given {got}")

    def local_experts(self, layer: int, rank: int) -> tuple[int, ...]:
        return self.local_expert_ids[layer][rank]

    def max_local_experts(self, layer: int) -> int:
        return max(len(ids) for ids in self.local_expert_ids[layer])

    def replicas(self, layer: int, expert: int) -> tuple[Replica, ...]:
        return self._replicas[layer][expert]

    @cached_property
    def _replicas(self) -> tuple[tuple[tuple[Replica, ...], ...], ...]:
        """[layer][expert] → its copies, ascending rank."""
        out = []
        for by_rank in self.local_expert_ids:
            per_expert: list[list[Replica]] = [[] for _ in range(self.num_experts)]
            for rank, ids in enumerate(by_rank):
                for slot, e in enumerate(ids):
                    per_expert[e].append((rank, slot))
            out.append(tuple(tuple(r) for r in per_expert))
        return tuple(out)
