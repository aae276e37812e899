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

from workers.group.graph_plan import DecodeGraphPlan
from workers.group.member import GroupMember
from workers.group.placement_update import PlacementUpdate
from workers.group.spec import GroupSpec
from workers.group.step_message import StepMessage
from workers.group.worker_graphs import ExpertGraphs, capture_expert_graphs
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
        self.decode_graphs: ExpertGraphs | None = None
        # The pending placement's layers, stacked ahead of the switch (by version).
        self._staged: tuple[int, dict[int, LayerExperts]] | None = None

    def stage_placement(self, update: PlacementUpdate) -> None:
        """Load the copies it lacks and stack every layer that changes, all off the step: the
        switch itself only swaps references. A layer holding the same experts keeps its stacks."""
        pairs = _pairs_of(update.expert_map, update.rank)
        wanted: dict[int, tuple[int, ...]] = {}
        for layer, e in pairs:
            wanted[layer] = (*wanted.get(layer, ()), e)
        held = self.experts  # the step thread may swap it, never mutates it
        changed = [layer for layer, ids in wanted.items()
                   if layer not in held or held[layer].expert_ids != ids]
        new = [(layer, e) for layer in changed for e in wanted[layer] if (layer, e) not in self.pairs]
        # Old and new stacks coexist until the switch: that peak is what must fit.
        self.ensure_weights_fit(self.checkpoint.expert_weight_bytes(
            [(layer, e) for layer in changed for e in wanted[layer]], self.dtype))
        loaded = self.checkpoint.load_expert_weights(new, self.dtype, progress=False, device=self.device)
        layers = {layer: held[layer] for layer in wanted if layer not in changed}
        layers.update(experts_by_layer({
            (layer, e): loaded.get((layer, e)) or _expert_tensors(held[layer], e)
            for layer in changed for e in wanted[layer]}))
        update.expert_map.check_holds(update.rank, {layer: ex.expert_ids for layer, ex in layers.items()})
        self._staged = (update.version, layers)

    def adopt_placement(self, update: PlacementUpdate) -> None:
        staged, self._staged = self._staged, None
        if staged is None or staged[0] != update.version:
            raise RuntimeError(f"rank {update.rank}: placement {update.version} was not prepared here")
        self.experts = staged[1]
        self.pairs = _pairs_of(update.expert_map, update.rank)

    def held_experts(self) -> tuple[LayerExpert, ...]:
        """The (layer, expert) copies this worker holds now: tests check a placement with it."""
        return self.pairs

    def on_joined(self) -> None:
        self.dispatcher = AllToAllDispatcher(self.rank, self.spec.expert_map, self.transport,
                                             self.spec.capacity_factor)
        self.decode_graphs = None  # they hold the old group, placement and experts: capture again

    def capture_decode_graphs(self, plan: DecodeGraphPlan) -> tuple[int, ...]:
        """Capture this worker's decode graphs (workers/group/worker_graphs.py), on every worker of
        the group at once; the batch sizes captured."""
        self.decode_graphs = capture_expert_graphs(self.dispatcher, self.experts, self.config, self.dtype,
                                                   plan)
        return self.decode_graphs.buckets

    @torch.inference_mode()
    def execute(self, low_latency_tokens: int | None = None, placement_version: int | None = None) -> int:
        """Serve one model step: every MoE layer, in order. Returns rows processed.

        The MoE block of moe.py without its route stage: this rank has no tokens of its own, so it
        dispatches an empty routing (receiving what the attention ranks send), runs its experts
        on those rows, and combines (sends them back)."""
        if placement_version is not None:
            self.follow_placement(placement_version)
        graphs = self.decode_graphs
        if graphs is not None:  # the step's bucket (buffers sized for it), replayed when captured
            low_latency_tokens = graphs.begin_step(low_latency_tokens)
            t0 = time.perf_counter()
            rows = graphs.replay()
            if rows is not None:
                self.busy_seconds += time.perf_counter() - t0
                self.num_steps += 1
                return rows
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
