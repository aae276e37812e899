"""CUDA graphs of a model group's decode steps, low-latency all-to-alls included.

The attention worker's graph of a bucket records its decode forward (embedding → layers, each
with its dispatch and combine all-to-alls → logits) over static inputs, as the single-process
engine's does (workers/model/cuda_graph_runner.py); the expert worker's records its step: every
layer's dispatch (receive) → experts → combine (send back), over receive buffers whose size the
bucket fixes. With NCCL the all-to-alls are kernels like any other, so the graphs hold them, and
a decode step is one replay per rank with no host round trip at all.

Collectives recorded in graphs must meet their peers, so (graph_plan.py):

- every rank captures at the same point: `capture_decode_graphs` is called on all workers of the
  group together, after it forms and after every re-form (a graph holds the process group it was
  captured with: a restarted worker or a new placement means capturing again);
- the plan's buckets largest first, each first run once eagerly (the warm-up: real collectives,
  the same on every rank); before each bucket all ranks agree, by a small all-to-all, whether
  every one of them still has budget (time, memory), so they end with the same buckets;
- per step every rank takes the step's bucket from its `low_latency_tokens` and sizes its
  low-latency buffers for it, replaying or not.

Padding rows of the attention worker's bucket are not dispatched (AllToAllDispatcher.padding); the
statistics a replay cannot record from Python are recorded by the graph (replay_stats.py).

`capture` is a parameter: CUDA graphs on CUDA; on the CPU the eager stand-in (static_capture.py)
runs the same capture protocol, buffers and replays, which is how the CPU tests check this code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workers.comm.transport import Transport
from workers.group.graph_plan import DecodeGraphPlan, dispatch_tokens, group_step_bucket
from workers.group.replay_stats import ReplayStats
from workers.model.attention import CUDA_TRITON, kernels_for
from workers.model.attention_metadata import SeqExtent, StepTables
from workers.model.cuda_graph_buckets import decode_step_bucket
from workers.model.cuda_graph_budget import CaptureBudget
from workers.model.cuda_graph_inputs import DecodeGraphInputs
from workers.model.cuda_graph_runner import DecodeGraphRunner, forward_logits, graph_shape
from workers.model.runner import ModelRunner
from workers.model.static_capture import CudaGraphCapture, EagerCapture, StaticCapture
from workers.moe.a2a_dispatcher import AllToAllDispatcher
from workers.moe.block import experts_stage
from workers.moe.experts import LayerExperts
from workers.moe.route import empty_routing
from workers.weights.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_BUDGET = CaptureBudget()
_MIB = 1 << 20


class AttentionGraphs:
    """What an attention worker's model runner replays: the group's bucket of each step."""

    def __init__(self, buckets: tuple[int, ...], runner: DecodeGraphRunner | None) -> None:
        self.buckets = buckets  # captured by the whole group
        self.runner = runner  # None when there are none
        self._bucket: int | None = None

    def begin_step(self, low_latency_tokens: int | None) -> int | None:
        """The step's low-latency buffer size in tokens, for the dispatcher's begin_step."""
        self._bucket = group_step_bucket(low_latency_tokens, self.buckets)
        return dispatch_tokens(low_latency_tokens, self.buckets)

    def step_bucket(self, extents: Sequence[SeqExtent]) -> int | None:
        """The bucket the runner replays this step in, None: eagerly. Every rank replays a step or
        none does (a collective must be captured on all ranks or none), so a worker with no
        sequence in the step replays all-padding rows, and a step that does not fit is an error."""
        bucket = self._bucket
        if bucket is None:
            return None
        max_context_len = self.runner.inputs.shape.max_context_len
        if extents and decode_step_bucket(extents, (bucket,), max_context_len) is None:
            raise RuntimeError(f"a low-latency step of {len(extents)} sequences does not fit its bucket "
                               f"{bucket}'s graph (decode rows within the static block table)")
        return bucket

    def run(self, token_ids: Sequence[int], extents: Sequence[SeqExtent], bucket: int,
            tables: StepTables | None = None) -> torch.Tensor:
        return self.runner.run(token_ids, extents, bucket, tables)


class ExpertGraphs:
    """An expert worker's steps, one graph per bucket of the group."""

    def __init__(self, steps: dict[int, Callable[[], int]]) -> None:
        self.steps = steps
        self.buckets = tuple(sorted(steps))
        self._bucket: int | None = None

    def begin_step(self, low_latency_tokens: int | None) -> int | None:
        self._bucket = group_step_bucket(low_latency_tokens, self.buckets)
        return dispatch_tokens(low_latency_tokens, self.buckets)

    def replay(self) -> int | None:
        """Rows processed by this step's replay; None when the step has no graph (run it eagerly)."""
        return self.steps[self._bucket]() if self._bucket is not None else None


@dataclass(frozen=True)
class _CountedReplay:
    step: Callable
    stats: ReplayStats
    bucket: int

    def __call__(self):
        out = self.step()
        self.stats.record_replay(self.bucket)
        return out


def capture_for(transport: Transport, plan: DecodeGraphPlan) -> StaticCapture:
    """CUDA graphs on CUDA, over NCCL only; the eager stand-in on the CPU (tests give a CPU group
    a plan; decode_graph_plan never does)."""
    backend = getattr(transport, "backend", "local")
    if transport.device.type == "cuda":
        if backend != "nccl":
            raise ValueError(f"decode graphs {plan.buckets} on the {backend} backend: its collectives "
                             "cannot be captured (decode_graph_plan gives such a group none)")
        # Thread-local: the actor's other threads (probes, stats) may use the device meanwhile.
        return CudaGraphCapture(transport.device, error_mode="thread_local")
    return EagerCapture()


@torch.inference_mode()
def capture_attention_graphs(runner: ModelRunner, dispatcher: AllToAllDispatcher, plan: DecodeGraphPlan, *,
                             scratch_block: int, budget: CaptureBudget = DEFAULT_BUDGET) -> AttentionGraphs:
    """Capture, and give `runner` to replay, this attention worker's graphs. `scratch_block`: a KV
    block no sequence is ever given (padding rows write there)."""
    runner.decode_graphs = None
    if not plan.enabled:
        return AttentionGraphs((), None)
    model, kv_cache, transport = runner.model, runner.kv_cache, dispatcher.transport
    capture: StaticCapture | None = capture_for(transport, plan)
    if transport.device.type == "cuda" and kernels_for(transport.device) is not CUDA_TRITON:
        # Without it decode attention gathers a dense batch as wide as the longest context allowed.
        log.warning("rank %d: the Triton paged-decode kernel does not load here", dispatcher.rank)
        capture = None
    stats = _replay_stats(dispatcher)
    shape = graph_shape(model, kv_cache, plan.buckets[-1], scratch_block)
    inputs = DecodeGraphInputs(shape, transport.device)

    def step_of(bucket: int) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            # Inside the graph: the mask is computed from this replay's inputs (padding rows have
            # context length 0), and the stats' counts are added by the graph.
            with stats.recording(bucket), dispatcher.padding(inputs.context_lens_R[:bucket] > 0):
                dispatcher.begin_step(bucket)
                return forward_logits(model, kv_cache, inputs, bucket)
        return step

    steps = capture_buckets(plan, step_of, capture, transport, budget, "attention")
    stats.discard()  # the warm-ups are not traffic to report
    graphs = AttentionGraphs((), None)
    if steps:
        graphs = AttentionGraphs(tuple(sorted(steps)), DecodeGraphRunner(
            inputs, {b: _CountedReplay(s, stats, b) for b, s in steps.items()}))
    runner.decode_graphs = graphs
    return graphs


@torch.inference_mode()
def capture_expert_graphs(dispatcher: AllToAllDispatcher, experts: dict[int, LayerExperts], cfg: ModelConfig,
                          dtype: torch.dtype, plan: DecodeGraphPlan,
                          budget: CaptureBudget = DEFAULT_BUDGET) -> ExpertGraphs:
    if not plan.enabled:
        return ExpertGraphs({})
    transport = dispatcher.transport
    capture = capture_for(transport, plan)
    stats = _replay_stats(dispatcher)

    def step_of(bucket: int) -> Callable[[], int]:
        def step() -> int:
            with stats.recording(bucket):
                dispatcher.begin_step(bucket)
                return moe_layers_for_others(dispatcher, experts, cfg, dtype)
        return step

    steps = capture_buckets(plan, step_of, capture, transport, budget, "expert")
    stats.discard()
    return ExpertGraphs({b: _CountedReplay(s, stats, b) for b, s in steps.items()})


def moe_layers_for_others(dispatcher: AllToAllDispatcher, experts: dict[int, LayerExperts], cfg: ModelConfig,
                          dtype: torch.dtype) -> int:
    """An expert worker's step (ExpertWorker.execute's loop): every layer's dispatch of an empty
    routing (receiving what the attention ranks send) → its experts → combine (sending it back).
    Returns the rows received, padding included (a Python int: fixed by the step's buffers)."""
    device = dispatcher.transport.device
    x_TH = torch.empty(0, cfg.hidden_size, dtype=dtype, device=device)
    routing = empty_routing(cfg.num_experts_per_tok, device)
    rows = 0
    for layer in range(cfg.num_hidden_layers):
        x_MH, plan = dispatcher.dispatch(layer, x_TH, routing)
        dispatcher.combine(layer, experts_stage(x_MH, plan, experts.get(layer)), plan)
        rows += x_MH.shape[0]
    return rows


def capture_buckets(plan: DecodeGraphPlan, step_of: Callable[[int], Callable], capture: StaticCapture | None,
                    transport: Transport, budget: CaptureBudget, kind: str) -> dict[int, Callable]:
    """Each bucket of the plan, largest first, the largest always, the others while every rank has
    budget left, so every rank ends with the same buckets. `capture` None: this rank cannot
    capture, and then no rank does (NCCL wants a collective captured on all its ranks or none)."""
    if not all_agree(transport, capture is not None):
        log.warning("rank %d (%s): decode CUDA graphs off: %s cannot capture them; every step runs eagerly",
                    transport.rank, kind, "this rank" if capture is None else "another rank")
        return {}
    device = transport.device
    base = _reserved(device)
    start = time.perf_counter()
    order = sorted(plan.buckets, reverse=True)
    steps: dict[int, Callable] = {}
    for i, bucket in enumerate(order):
        # The largest always (as in the single process); then only while every rank has budget.
        reason = budget.spent(time.perf_counter() - start, _reserved(device) - base) if i else None
        if i and not all_agree(transport, reason is None):
            log.warning("rank %d (%s): decode CUDA graphs: skipping batch sizes %s: %s; smaller steps pad up "
                        "to %d", transport.rank, kind, order[i:], reason or "another rank's budget is spent",
                        order[i - 1])
            break
        try:
            steps[bucket] = capture(step_of(bucket))
        except RuntimeError as e:
            raise RuntimeError(f"rank {transport.rank}: capturing the decode step at batch size {bucket} "
                               f"failed: {e} (enforce_eager runs without CUDA graphs)") from e
        log.info("rank %d (%s): decode CUDA graph %d/%d: batch size %d captured (%.1f s, %.0f MiB so far)",
                 transport.rank, kind, i + 1, len(order), bucket, time.perf_counter() - start,
                 (_reserved(device) - base) / _MIB)
    return steps


def all_agree(transport: Transport, ok: bool) -> bool:
    """Whether every rank says `ok`: each sends its vote to all (one tiny all-to-all; a host read,
    outside any capture)."""
    votes_W1 = transport.exchange_counts(torch.full((transport.world_size, 1), int(ok), dtype=torch.int64))
    return bool(votes_W1.min())


def _replay_stats(dispatcher: AllToAllDispatcher) -> ReplayStats:
    emap, rank = dispatcher.expert_map, dispatcher.rank
    stats = ReplayStats([emap.local_experts(layer, rank) for layer in range(emap.num_layers)],
                        dispatcher.transport.device)
    dispatcher.stats = stats
    return stats


def _reserved(device: torch.device) -> int:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
