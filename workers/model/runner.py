"""Runs one scheduled step on a model: attention metadata, forward, sample.

The metadata comes from block tables kept across steps (incremental_tables.py): a decode step
patches the rows that changed instead of rebuilding every sequence's table.

A pure decode step may instead replay a captured CUDA graph (workers/model/cuda_graph_runner.py);
sampling is the same either way.

The same runner serves the single-process engine and each attention worker actor; a
worker with nothing scheduled still calls `execute` with an empty batch, because its
MoE layers must join every all-to-all of the step.
"""

from __future__ import annotations

import torch

from workers.model.attention_metadata import AttentionMetadata, SeqExtent
from workers.model.batch_spec import ScheduledBatch
from workers.model.cuda_graph_runner import DecodeGraphRunner
from workers.model.incremental_tables import IncrementalTables
from workers.model.kv_cache import KVCache
from workers.model.mixtral import MixtralModel
from workers.model.sampler import SampleKey, sample
from workers.model.step_output import StepOutput


class ModelRunner:
    def __init__(self, model: MixtralModel, kv_cache: KVCache,
                 decode_graphs: DecodeGraphRunner | None = None) -> None:
        """`decode_graphs`: replays pure decode steps that fit one of its buckets (the
        single-process engine on CUDA); None, or any other step, runs eagerly."""
        if kv_cache.k_BPGD[0].device != model.weights.embed_VH.device:
            raise ValueError(f"the KV cache is on {kv_cache.k_BPGD[0].device}, "
                             f"the weights on {model.weights.embed_VH.device}")
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.weights.embed_VH.device
        self.decode_graphs = decode_graphs
        # The step's block tables, patched from one step to the next rather than rebuilt.
        self.tables = IncrementalTables(kv_cache.block_size)

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        seqs = batch.seqs
        extents = [SeqExtent(s.start_pos, len(s.token_ids), s.block_table) for s in seqs]
        tables = self.tables.update([s.seq_id for s in seqs], extents)
        wanted = [i for i, s in enumerate(seqs) if s.needs_sample]
        graphs = self.decode_graphs
        bucket = graphs.step_bucket(extents) if graphs is not None else None
        if bucket is not None:
            # One token per sequence: row i of the replay's logits is sequence i's.
            logits_SV = graphs.run([s.token_ids[0] for s in seqs], extents, bucket, tables)
            if not wanted:
                return StepOutput.empty()
            if len(wanted) < len(seqs):
                logits_SV = logits_SV[wanted]
        else:
            # Host-built, one copy each onto the device (non-blocking from pinned memory on a GPU).
            meta = AttentionMetadata.from_tables(extents, tables, self.block_size, self.device)
            ids_T = _to_device([t for s in seqs for t in s.token_ids], self.device)
            hidden_TH = self.model.forward(ids_T, meta, self.kv_cache)
            if not wanted:
                return StepOutput.empty()
            rows = [meta.last_token_indices[i] for i in wanted]
            logits_SV = self.model.logits(hidden_TH[rows])
        picked = [seqs[i] for i in wanted]
        keys = [SampleKey(seed=s.sampling.seed, seq_id=s.seq_id, step=s.output_len) for s in picked]
        out = sample(logits_SV, [s.sampling for s in picked], keys)
        return StepOutput(
            seq_ids=tuple(s.seq_id for s in picked),
            token_ids=tuple(out.token_ids),
            logprobs=tuple(out.logprobs),
        )


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
