"""AttentionWorker: embeddings, attention, routers, LM head, the paged KV cache of its
sequences, and sampling. Its MoE layers send routed tokens to the expert workers.

A plain class: cluster/worker_group.py makes it a Ray actor.
"""

from __future__ import annotations

import time

from workers.a2a_dispatcher import AllToAllDispatcher
from workers.batch_spec import ScheduledBatch
from workers.checkpoint import Checkpoint
from workers.dtypes import parse_dtype
from workers.group_member import GroupMember
from workers.group_spec import GroupSpec
from workers.kv_cache import KVCache
from workers.mixtral import MixtralModel
from workers.model_runner import ModelRunner
from workers.model_weights import AttentionSideWeights
from workers.step_output import StepOutput


class AttentionWorker(GroupMember):
    kind = "attention"

    def __init__(self, spec: GroupSpec, rank: int) -> None:
        if rank >= spec.num_attention_workers:
            raise ValueError(f"rank {rank} is an expert rank")
        super().__init__(spec, rank)
        ckpt = Checkpoint.open(spec.model_dir)
        self.config = ckpt.config
        self.dtype = parse_dtype(spec.dtype, auto=self.config.torch_dtype)
        self.weights = AttentionSideWeights.from_state(
            self.config, ckpt.load_attention_weights(self.dtype, progress=False))
        self.kv_cache = KVCache(self.config, spec.num_kv_blocks, spec.block_size, dtype=self.dtype)
        self.runner: ModelRunner | None = None
        self.dispatcher: AllToAllDispatcher | None = None

    def on_joined(self) -> None:
        self.dispatcher = AllToAllDispatcher(self.rank, self.spec.expert_map, self.transport, {},
                                             self.spec.capacity_factor)
        self.runner = ModelRunner(MixtralModel(self.config, self.weights, self.dispatcher), self.kv_cache)

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        t0 = time.perf_counter()
        out = self.runner.execute(batch)
        self.busy_seconds += time.perf_counter() - t0
        self.num_steps += 1
        return out
