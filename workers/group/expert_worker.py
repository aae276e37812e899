"""ExpertWorker: only its experts' weights. Per step and layer: dispatch (receive) →
experts → combine (send back). It holds no request state, so a restart loses nothing.

A plain class: cluster/ray_executor.py makes it a Ray actor.
"""

from __future__ import annotations

import time

import torch

from workers.group.member import GroupMember
from workers.group.spec import GroupSpec
from workers.group.step_message import StepMessage
from workers.model.model_weights import experts_by_layer
from workers.moe.a2a_dispatcher import AllToAllDispatcher
from workers.moe.block import experts_stage
from workers.moe.route import empty_routing


class ExpertWorker(GroupMember):
    kind = "expert"

    def __init__(self, spec: GroupSpec, rank: int) -> None:
        if rank < spec.num_attention_workers:
            raise ValueError(f"rank {rank} is an attention rank")
        super().__init__(spec, rank)
        emap = spec.expert_map
        pairs = [(layer, e) for layer in range(emap.num_layers) for e in emap.local_experts(layer, rank)]
        self.pairs = tuple(pairs)
        self.ensure_weights_fit(self.checkpoint.expert_weight_bytes(pairs, self.dtype))
        self.experts = experts_by_layer(
            self.checkpoint.load_expert_weights(pairs, self.dtype, progress=False, device=self.device))
        emap.check_holds(rank, {layer: ex.expert_ids for layer, ex in self.experts.items()})
        self.dispatcher: AllToAllDispatcher | None = None

    def on_joined(self) -> None:
        self.dispatcher = AllToAllDispatcher(self.rank, self.spec.expert_map, self.transport,
                                             self.spec.capacity_factor)

    @torch.inference_mode()
    def execute(self, low_latency_tokens: int | None = None) -> int:
        """Serve one model step: every MoE layer, in order. Returns rows processed.

        The MoE block of moe.py without its route stage: this rank has no tokens of its own, so it
        dispatches an empty routing (receiving what the attention ranks send), runs its experts
        on those rows, and combines (sends them back)."""
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
        return self.execute(message.low_latency_tokens)
