"""The 2-layer full-width slice bench_gpu decodes: its random checkpoint, its decode batches,
the step timer, which experts a step hits, and the bytes/FLOPs a step cannot avoid (the bound).
See tests/bench/bench_gpu.py's docstring.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from workers.model.batch_spec import ScheduledBatch, ScheduledSeq
from workers.model.runner import ModelRunner
from workers.model.sampling_params import SamplingParams
from workers.weights.config import ModelConfig
from workers.weights.weight_names import checkpoint_shapes

BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


# -- the checkpoint -----------------------------------------------------------------------


def write_random_checkpoint(out: Path, cfg: ModelConfig, device: torch.device, seed: int = 0) -> float:
    """config.json and one model.safetensors of random weights (drawn on `device`, which is fast);
    returns the bytes written."""
    import json

    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=1))
    dtype = getattr(torch, cfg.torch_dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in sorted(checkpoint_shapes(cfg).items()):
        if len(shape) == 1:  # the RMSNorm weights
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype).cpu()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- steps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeBatches:
    """`num_seqs` sequences, each with a `context`-token random prompt of its own, in disjoint
    KV blocks; a decode step at batch B writes position `context` of the first B, so it repeats."""

    num_seqs: int
    context: int
    vocab_size: int

    @property
    def blocks_per_seq(self) -> int:
        return -(-(self.context + 1) // BLOCK_SIZE)

    @property
    def num_kv_blocks(self) -> int:
        return self.num_seqs * self.blocks_per_seq

    def table(self, seq_id: int) -> tuple[int, ...]:
        first = seq_id * self.blocks_per_seq
        return tuple(range(first, first + self.blocks_per_seq))

    def prompts(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(1)
        return torch.randint(3, self.vocab_size, (self.num_seqs, self.context), generator=gen).tolist()

    def prefill(self, max_tokens: int = 4096) -> list[ScheduledBatch]:
        seqs = [ScheduledSeq(i, tuple(p), 0, self.table(i), True, GREEDY, 0)
                for i, p in enumerate(self.prompts())]
        per_step = max(1, max_tokens // self.context)
        return [ScheduledBatch(tuple(seqs[i:i + per_step])) for i in range(0, len(seqs), per_step)]

    def decode(self, n: int) -> ScheduledBatch:
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(3, self.vocab_size, (n,), generator=gen).tolist()
        return ScheduledBatch(tuple(ScheduledSeq(i, (ids[i],), self.context, self.table(i), True, GREEDY, 0)
                                    for i in range(n)))


class StepTimer:
    """Milliseconds of one call: CUDA events around it on a GPU (host overhead between launches
    counts, as in serving), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def median_ms(timer: StepTimer, fn: Callable[[], object], steps: int, warm_up: int = 3) -> float:
    for _ in range(warm_up):
        fn()
    return statistics.median(timer(fn) for _ in range(steps))


class RoutingProbe:
    """Wraps a model's dispatcher for one untimed step: how many distinct experts each layer's tokens
    chose (what the step must read of the expert weights)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.experts_hit: dict[int, int] = {}

    def dispatch(self, layer, x_TH, routing):
        self.experts_hit[layer] = int(torch.unique(routing.topk_ids_TK).numel())
        return self.inner.dispatch(layer, x_TH, routing)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def experts_hit(runner: ModelRunner, batch: ScheduledBatch) -> tuple[int, bool]:
    """(layer, expert) pairs the step's tokens route to, summed over layers, and whether that was
    seen: a step that never calls the dispatcher (a replayed CUDA graph, say) gets the estimate of
    uniform routing, every layer hitting min(experts, tokens x top-k)."""
    model, cfg = runner.model, runner.model.cfg
    probe = RoutingProbe(model.dispatcher)
    model.dispatcher = probe
    try:
        runner.execute(batch)
    finally:
        model.dispatcher = probe.inner
    if len(probe.experts_hit) == cfg.num_hidden_layers:
        return sum(probe.experts_hit.values()), True
    per_layer = min(cfg.num_local_experts, batch.num_tokens * cfg.num_experts_per_tok)
    return cfg.num_hidden_layers * per_layer, False


# -- the bound ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    read_bytes: int
    flops: int

    def bound_ms(self, bandwidth: float, flops_per_s: float) -> float:
        return 1e3 * max(self.read_bytes / bandwidth, self.flops / flops_per_s)


def decode_step_cost(cfg: ModelConfig, batch: int, context: int, num_experts_hit: int, elem: int) -> StepCost:
    """What a decode step of `batch` tokens over `context`-token contexts must read and compute."""
    H, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim_, cfg.num_key_value_heads * cfg.head_dim_
    per_layer = H * q + 2 * H * kv + q * H + cfg.num_local_experts * H + 2 * H  # q k v o, router, norms
    attention_side = L * per_layer + H + V * H + batch * H  # + final norm, LM head, embedding rows
    expert = 3 * H * I
    kv_read = batch * (context + 1) * L * 2 * kv
    read = (attention_side + num_experts_hit * expert + kv_read) * elem
    matmul = 2 * batch * (L * (per_layer - 2 * H) + V * H + L * cfg.num_experts_per_tok * expert)
    attend = 2 * 2 * batch * (context + 1) * L * q  # scores and values
    return StepCost(read, matmul + attend)


