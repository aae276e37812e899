"""ExpertWorker: only its experts' weights. Per step and layer: dispatch (receive) →
experts → combine (send back). It holds no request state, so a restart loses nothing.

When the group's placement changes, it loads the copies it will hold and lacks (memory-mapped
from the checkpoint, on another actor thread while steps go on: `stage_placement`), and at the
switch restacks its layers from what it held and what it loaded; copies it no longer holds are
freed with the old stacks.

A plain class: cluster/ray_executor.py makes it a Ray actor.
"""

from __future__ import annotations

import time

import torch

from workers.group.member import GroupMember
from workers.group.placement_update import PlacementUpdate
from workers.group.spec import GroupSpec
from workers.group.step_message import StepMessage
from workers.model.model_weights import experts_by_layer
from workers.moe.a2a_dispatcher import AllToAllDispatcher
from workers.moe.block import experts_stage
from workers.moe.expert_map import ExpertMap
from workers.moe.experts import ExpertTensorsLike, LayerExperts
from workers.moe.route import empty_routing
from workers.weights.checkpoint import ExpertTensors

LayerExpert = tuple[int, int]


class ExpertWorker(GroupMember):
    kind = "expert"

    def __init__(self, spec: GroupSpec, rank: int) -> None:
        if rank < spec.num_attention_workers:
            raise ValueError(f"rank {rank} is an attention rank")
        super().__init__(spec, rank)
        emap = spec.expert_map
        pairs = _pairs_of(emap, rank)
        self.pairs = pairs
        self.ensure_weights_fit(self.checkpoint.expert_weight_bytes(pairs, self.dtype))
        self.experts = experts_by_layer(
            self.checkpoint.load_expert_weights(pairs, self.dtype, progress=False, device=self.device))
        emap.check_holds(rank, {layer: ex.expert_ids for layer, ex in self.experts.items()})
        self.dispatcher: AllToAllDispatcher | None = None
        self._staged: dict[LayerExpert, ExpertTensors] = {}  # loaded for the pending placement

    def stage_placement(self, update: PlacementUpdate) -> None:
        new = [p for p in _pairs_of(update.expert_map, update.rank) if p not in self.pairs]
        # Held and new copies coexist until the switch: that peak is what must fit.
        self.ensure_weights_fit(self.checkpoint.expert_weight_bytes(new, self.dtype))
        self._staged = self.checkpoint.load_expert_weights(new, self.dtype, progress=False,
                                                           device=self.device)

    def adopt_placement(self, update: PlacementUpdate) -> None:
        pairs = _pairs_of(update.expert_map, update.rank)
        held = {p: _expert_tensors(self.experts[p[0]], p[1]) for p in pairs if p in self.pairs}
        staged, self._staged = self._staged, {}
        missing = [p for p in pairs if p not in held and p not in staged]
        if missing:
            raise RuntimeError(f"rank {update.rank}: placement {update.version} needs experts {missing}, "
                               "which were not prepared")
        self.experts = experts_by_layer({p: held.get(p) or staged[p] for p in pairs})
        update.expert_map.check_holds(update.rank,
                                      {layer: ex.expert_ids for layer, ex in self.experts.items()})
        self.pairs = pairs

    def held_experts(self) -> tuple[LayerExpert, ...]:
        """The (layer, expert) copies this worker holds now: tests check a placement with it."""
        return self.pairs

    def on_joined(self) -> None:
        self.dispatcher = AllToAllDispatcher(self.rank, self.spec.expert_map, self.transport,
                                             self.spec.capacity_factor)

    @torch.inference_mode()
    def execute(self, low_latency_tokens: int | None = None, placement_version: int | None = None) -> int:
        """Serve one model step: every MoE layer, in order. Returns rows processed.

        The MoE block of moe.py without its route stage: this rank has no tokens of its own, so it
        dispatches an empty routing (receiving what the attention ranks send), runs its experts
        on those rows, and combines (sends them back)."""
        if placement_version is not None:
            self.follow_placement(placement_version)
        cfg, d = self.config, self.dispatcher
        d.begin_step(low_latency_tokens)  # the mode the attention workers' batches carry
        x_TH = torch.empty(0, cfg.hidden_size, dtype=self.dtype, device=self.device)
        routing = empty_routing(cfg.num_experts_per_tok, self.device)
        rows = 0
        for layer in range(cfg.num_hidden_layers):
            x_MH, plan = d.dispatch(layer, x_TH, routing)
            t0 = time.perf_counter()
            y_MH = experts_stage(x_MH, plan, self.experts.get(layer))
            self.busy_seconds += time.perf_counter() - t0
            d.combine(layer, y_MH, plan)
            rows += x_MH.shape[0]
        self.num_steps += 1
        return rows

    def run_step(self, message: StepMessage) -> int:
        return self.execute(message.low_latency_tokens, message.placement_version)


def _pairs_of(expert_map: ExpertMap, rank: int) -> tuple[LayerExpert, ...]:
    return tuple((layer, e) for layer in range(expert_map.num_layers)
                 for e in expert_map.local_experts(layer, rank))


def _expert_tensors(layer: LayerExperts, expert: int) -> ExpertTensorsLike:
    """One held expert's weights, as views into its layer's stacks (restacking copies them)."""
    i = layer.expert_ids.index(expert)
    w13_FH = layer.w13_EFH[i]
    f = w13_FH.shape[0] // 2
    return ExpertTensors(w1=w13_FH[:f], w2=layer.w2_EHF[i], w3=w13_FH[f:])
