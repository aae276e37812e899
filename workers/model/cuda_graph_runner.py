"""DecodeGraphRunner: the decode step's CUDA graphs, one per batch-size bucket, over static inputs.

Why: a decode step launches a few hundred small kernels, and on a GPU launching them is the
step (a 2-layer step on an H200: under 1 ms of kernels in a 6–10 ms step). A CUDA graph
records the launches of embedding → layers → final norm → logits once and replays them with
one call.

Per step (ModelRunner.execute): a pure decode step that fits a captured bucket is padded to it
(cuda_graph_buckets.py), written into the static buffers (cuda_graph_inputs.py) and replayed;
the logits of its own rows are then sampled eagerly, as an eager step's are. Prefill and
mixed steps, and batches larger than every bucket, run eagerly. Graphs are captured at start-up
by cuda_graph_capture.py; `DecodeGraphRunner.eager` runs the same padded steps eagerly on any
device, so the CPU tests check the padding and this plumbing against the plain eager step.

Shapes: S sequences of the step, B rows of its bucket, V vocab.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from workers.model.attention_metadata import SeqExtent, StepTables
from workers.model.cuda_graph_buckets import DEFAULT_BUCKET_SIZES, decode_buckets, decode_step_bucket
from workers.model.cuda_graph_inputs import DecodeGraphInputs, DecodeGraphShape, pad_decode_tables
from workers.model.kv_cache import KVCache
from workers.model.mixtral import MixtralModel


class StaticStep(Protocol):
    """One bucket's forward over the static buffers: fp32 logits of all its rows, [B, V]."""

    def __call__(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class GraphReplay:
    graph: torch.cuda.CUDAGraph
    output: object  # what the captured step returned: its tensors are rewritten by every replay

    def __call__(self):
        self.graph.replay()
        return self.output


@dataclass(frozen=True)
class EagerStaticStep:
    """The forward a graph records, run eagerly on the same buffers (the stand-in off CUDA)."""

    model: MixtralModel
    kv_cache: KVCache
    inputs: DecodeGraphInputs
    bucket: int

    def __call__(self) -> torch.Tensor:
        return forward_logits(self.model, self.kv_cache, self.inputs, self.bucket)


def forward_logits(model: MixtralModel, kv_cache: KVCache, inputs: DecodeGraphInputs,
                   bucket: int) -> torch.Tensor:
    """What a decode graph computes: the bucket's rows through the model, fp32 logits [B, V]."""
    hidden_BH = model.forward(inputs.token_ids(bucket), inputs.metadata(bucket), kv_cache)
    return model.logits(hidden_BH)


def graph_shape(model: MixtralModel, kv_cache: KVCache, max_batch: int,
                scratch_block: int) -> DecodeGraphShape:
    """Static buffers wide enough for any context the model allows, padding in `scratch_block`."""
    if not 0 <= scratch_block < kv_cache.num_blocks:
        raise ValueError(f"scratch block {scratch_block} is not one of the cache's {kv_cache.num_blocks}")
    P = kv_cache.block_size
    return DecodeGraphShape(max_batch=max_batch, max_blocks=math.ceil(model.cfg.max_position_embeddings / P),
                            block_size=P, scratch_block=scratch_block)


class DecodeGraphRunner:
    def __init__(self, inputs: DecodeGraphInputs, steps: Mapping[int, StaticStep]) -> None:
        if not steps:
            raise ValueError("a DecodeGraphRunner needs at least one bucket")
        self.inputs = inputs
        self.steps = dict(steps)
        self.buckets = tuple(sorted(self.steps))
        self.runs_per_bucket: collections.Counter[int] = collections.Counter()  # steps it served, by bucket

    @classmethod
    def eager(cls, model: MixtralModel, kv_cache: KVCache, *, scratch_block: int, max_num_seqs: int,
              sizes: Sequence[int] = DEFAULT_BUCKET_SIZES) -> DecodeGraphRunner:
        """Padded decode steps run eagerly over the static buffers, on the cache's device."""
        buckets = decode_buckets(max_num_seqs, sizes)
        inputs = DecodeGraphInputs(graph_shape(model, kv_cache, buckets[-1], scratch_block),
                                   kv_cache.k_BPGD[0].device)
        return cls(inputs, {b: EagerStaticStep(model, kv_cache, inputs, b) for b in buckets})

    def step_bucket(self, extents: Sequence[SeqExtent]) -> int | None:
        """The bucket this step replays in; None: run it eagerly."""
        return decode_step_bucket(extents, self.buckets, self.inputs.shape.max_context_len)

    def run(self, token_ids: Sequence[int], extents: Sequence[SeqExtent], bucket: int,
            tables: StepTables | None = None) -> torch.Tensor:
        """fp32 logits of the step's S rows, [S, V], in `extents` order. A view of the graph's
        output: read it before the next step replays. `tables`: the step's block tables when the
        caller keeps them (the model runner does); None builds them from `extents`."""
        tables = tables if tables is not None else StepTables.build(extents, self.inputs.shape.block_size)
        self.inputs.write(pad_decode_tables(token_ids, tables, bucket, self.inputs.shape))
        logits_BV = self.steps[bucket]()
        self.runs_per_bucket[bucket] += 1
        return logits_BV[:len(extents)]
