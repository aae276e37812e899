"""AttentionWorker: embeddings, attention, routers, LM head, the paged KV cache of its
sequences, and sampling. Its MoE layers send routed tokens to the expert workers.

A plain class: cluster/ray_executor.py makes it a Ray actor.
"""

from __future__ import annotations

import time

from workers.device.memory import MemoryReport
from workers.group.graph_plan import DecodeGraphPlan
from workers.group.member import GroupMember
from workers.group.spec import GroupSpec
from workers.group.step_message import StepMessage
from workers.group.worker_graphs import capture_attention_graphs
from workers.model.batch_spec import ScheduledBatch
from workers.model.kv_cache import KVCache
from workers.model.kv_cache_sizing import decide_num_kv_blocks
from workers.model.mixtral import MixtralModel
from workers.model.model_weights import AttentionSideWeights
from workers.model.runner import ModelRunner
from workers.model.step_output import StepOutput
from workers.moe.a2a_dispatcher import AllToAllDispatcher


class AttentionWorker(GroupMember):
    kind = "attention"

    def __init__(self, spec: GroupSpec, rank: int) -> None:
        if rank >= spec.num_attention_workers:
            raise ValueError(f"rank {rank} is an expert rank")
        super().__init__(spec, rank)
        weight_bytes = self.checkpoint.attention_weight_bytes(self.dtype)
        self.ensure_weights_fit(weight_bytes)
        state = self.checkpoint.load_attention_weights(self.dtype, progress=False, device=self.device)
        self.weights = AttentionSideWeights.from_state(self.config, state)
        num_blocks = decide_num_kv_blocks(spec.cache, self.config, self.dtype, self.device,
                                          weight_bytes=weight_bytes, gpu_fraction=spec.gpu_fraction)
        # One block past those the engine hands out: where padding rows of a decode graph write.
        self.scratch_block = num_blocks
        self.kv_cache = KVCache(self.config, num_blocks + 1, spec.cache.block_size, dtype=self.dtype,
                                device=self.device)
        self.memory = MemoryReport(str(self.device), str(self.dtype).removeprefix("torch."), weight_bytes,
                                   num_blocks, spec.cache.block_size, self.kv_cache.nbytes)
        self.runner: ModelRunner | None = None
        self.dispatcher: AllToAllDispatcher | None = None

    def memory_report(self) -> MemoryReport:
        return self.memory

    def on_joined(self) -> None:
        """A new dispatcher on the new process group or placement; the runner (and the KV cache it
        writes) stays."""
        self.dispatcher = AllToAllDispatcher(self.rank, self.spec.expert_map, self.transport,
                                             self.spec.capacity_factor)
        if self.runner is None:
            model = MixtralModel(self.config, self.weights, self.dispatcher, experts={})  # experts are remote
            self.runner = ModelRunner(model, self.kv_cache)
        else:
            self.runner.model.dispatcher = self.dispatcher
        self.runner.decode_graphs = None  # they hold the old group or placement: capture_decode_graphs again

    def capture_decode_graphs(self, plan: DecodeGraphPlan) -> tuple[int, ...]:
        """Capture this worker's decode graphs (workers/group/worker_graphs.py), on every worker of
        the group at once; the batch sizes captured."""
        return capture_attention_graphs(self.runner, self.dispatcher, plan,
                                        scratch_block=self.scratch_block).buckets

    def execute(self, batch: ScheduledBatch, placement_version: int | None = None) -> StepOutput:
        if placement_version is not None:
            self.follow_placement(placement_version)
        t0 = time.perf_counter()
        tokens, graphs = batch.low_latency_tokens, self.runner.decode_graphs
        if graphs is not None:  # the low-latency buffers of every rank are sized for the step's bucket
            tokens = graphs.begin_step(tokens)
        self.dispatcher.begin_step(tokens)
        out = self.runner.execute(batch)
        self.busy_seconds += time.perf_counter() - t0
        self.num_steps += 1
        return out

    def run_step(self, message: StepMessage) -> StepOutput:
        return self.execute(message.batches[self.rank], message.placement_version)
