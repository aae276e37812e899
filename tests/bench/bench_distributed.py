"""Step time of the expert-parallel Ray group vs the single-process engine, and where it goes.

Run from the repository root: `python -m tests.bench.bench_distributed` (`--quick` for a
smoke run). Not a test: nothing here asserts a time.

Set-up: the "small" model of bench_engine (hidden 1024, intermediate 3584, 8 experts top-2,
2 layers, vocab 32000, fp32). Two simulated nodes on loopback (ray.cluster_utils): the head
node advertises `moe_attention` and holds the attention worker (and this driver), the second
advertises `moe_expert` and holds both expert workers (4 experts each); the all-to-alls run
over gloo. Every torch process gets one intra-op thread: the single-process engine here, each
of the three workers there (the machine may have only two cores).

Each step is one executor call on a synthetic ScheduledBatch, over a KV cache that a prefill
filled first (the same prefill on both sides):

    decode N    N sequences of `--context` tokens, one new token each, all sampled
    prefill N   one new sequence of N tokens, the last sampled

Systems, timed interleaved from one asyncio loop (order rotated per repetition), in two phases:

    phase 1, no compiled graph alive:
      local         LocalExecutor.execute: the single-process engine's step (ModelRunner in a thread)
      ray           RayExecutor.execute_over_ray: one Ray actor call per worker per step
      channel       RayExecutor.execute (control "channel"): the same workers' step loops, fed
                    through the shared-memory ring (the attention worker, on the engine's node)
                    and TCP (the expert workers, on the other node); no Ray call per step
      ray / channel low-latency   the same two with the engine's dispatch-mode rule applied
      ray no-op     the same fan-out (three actors on the same nodes, batch as argument) to no-ops
      channel no-op the same three actors' step loops (no-ops), fed by a step broadcast
    phase 2, the group compiled:
      local (cgraph alive)  as local: what the compiled graph's pollers cost this process
      cgraph        bench-local prototype: the same worker calls as one Ray Compiled Graph
    then, alone:
      cgraph no-op  the no-op fan-out compiled

Compiled graphs get phases of their own because they busy-poll: across nodes the driver keeps a
channel thread spinning for as long as a graph exists, and a reader spins while it waits for a
result. On a two-core box that takes a core from everything else, so they must not share a phase
with the systems they are compared with. Every ratio is against phase 1's local.

Attribution: the workers' stats, drained after every step, split the distributed step. Rank 0
(the attention worker) reports its time inside execute and its dispatch + combine, which wait
for the remote experts; the expert workers report their grouped-experts time. Per step,

    distributed − local ≈ control (step − rank 0's execute: the Ray call, or the channel)
                        + L × a2a+wait (rank 0's dispatch + combine − the busiest remote experts)
                        + L × Δexperts (remote experts − the local MoE stages)
                        + Δnon-MoE (attention, router, LM head, sampling: worker − single process)

and the no-op fan-out shows what the Ray call costs with no work behind it. The channel and
the Ray-call path run on the same workers in the same phase, so their ratio is like for like.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from cluster.distributed_engine import build_group_spec
from cluster.engine_config import EngineConfig
from cluster.executor import LocalExecutor
from cluster.ray_executor import RayExecutor
from cluster.topology import TopologyConfig
from cluster.worker_config import WorkerConfig
from tests.bench.bench_engine import write_small_checkpoint
from tests.bench.bench_util import Samples
from tests.bench.distributed_report import (
    CHANNEL_LOW_LATENCY,
    DISTRIBUTED,
    LOCAL,
    LOW_LATENCY,
    TARGET_TOKENS,
    WORKER_FIELDS,
    Result,
    report,
)
from tests.bench.distributed_systems import (
    ChannelNoOpFanOut,
    CompiledGroup,
    CompiledNoOpFanOut,
    LowLatencyGroup,
    NoOpFanOut,
    OverRayCalls,
    drain_stats,
    start_cluster,
)
from workers.model.batch_spec import ScheduledBatch, ScheduledSeq
from workers.model.kv_cache import KVCache
from workers.model.loader import load_local_model
from workers.model.runner import ModelRunner
from workers.model.sampling_params import SamplingParams
from workers.weights.config import ModelConfig

KINDS = ("decode", "prefill")
BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


# -- batches ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchMaker:
    """Block tables over one KV cache layout: decode sequences first, then the prefill sequence."""

    num_seqs: int  # decode sequences (the largest decode N)
    context: int  # their prefilled length
    max_prefill: int  # the longest prefill N

    @property
    def blocks_per_seq(self) -> int:
        return -(-(self.context + 1) // BLOCK_SIZE)

    @property
    def num_kv_blocks(self) -> int:
        return self.num_seqs * self.blocks_per_seq + -(-self.max_prefill // BLOCK_SIZE)

    def table(self, seq_id: int) -> tuple[int, ...]:
        if seq_id < self.num_seqs:
            first = seq_id * self.blocks_per_seq
            return tuple(range(first, first + self.blocks_per_seq))
        return tuple(range(self.num_seqs * self.blocks_per_seq, self.num_kv_blocks))

    def setup(self, vocab: int, max_tokens: int = 512) -> list[ScheduledBatch]:
        """Prefill every decode sequence's context, in steps of at most `max_tokens`."""
        gen = torch.Generator().manual_seed(0)
        seqs = [ScheduledSeq(i, tuple(torch.randint(3, vocab, (self.context,), generator=gen).tolist()), 0,
                             self.table(i), False, GREEDY, 0) for i in range(self.num_seqs)]
        per_step = max(1, max_tokens // self.context)
        return [ScheduledBatch(tuple(seqs[i:i + per_step])) for i in range(0, len(seqs), per_step)]

    def step(self, kind: str, n: int) -> ScheduledBatch:
        """Rewrites the same KV slots every time, so a step can be repeated."""
        if kind == "decode":
            return ScheduledBatch(tuple(
                ScheduledSeq(i, (3 + i,), self.context, self.table(i), True, GREEDY, 0) for i in range(n)))
        sid = self.num_seqs
        prompt = tuple(range(3, 3 + n))
        return ScheduledBatch((ScheduledSeq(sid, prompt, 0, self.table(sid), True, GREEDY, 0),))


# -- the single-process side --------------------------------------------------------------


class TimedDispatcher:
    """Wraps the local dispatcher to time its MoE stages: from the start of dispatch to the end
    of combine, which brackets the experts stage the MoE block runs between them."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.seconds = 0.0
        self._started = 0.0

    def dispatch(self, layer, x_TH, routing):
        self._started = time.perf_counter()
        return self.inner.dispatch(layer, x_TH, routing)

    def combine(self, layer, y_MH, plan):
        out = self.inner.combine(layer, y_MH, plan)
        self.seconds += time.perf_counter() - self._started
        return out

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


# -- measurement --------------------------------------------------------------------------


async def measure(res: Result, batches: tuple[ScheduledBatch, ...], systems: dict, timed: TimedDispatcher,
                  group: RayExecutor, repeats: int, bar: tqdm) -> None:
    """Every system has `await execute(batches)`; one repetition runs each once, order rotated."""
    for system in systems:
        res.times[system] = Samples()
        res.stats[system] = {f: Samples() for f in (("local_moe",) if system in LOCAL else WORKER_FIELDS)}
    for executor in systems.values():  # warm-up: first calls allocate and fill caches
        await executor.execute(batches)
    timed.take()
    drain_stats(group)
    order = list(systems)
    for rep in range(repeats):
        shift = rep % len(order)
        for system in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            await systems[system].execute(batches)
            seconds = time.perf_counter() - t0
            res.times[system].add(seconds)
            seen = res.stats[system]
            if system in LOCAL:
                seen["local_moe"].add(timed.take())
            elif system in DISTRIBUTED:
                step = drain_stats(group)  # untimed: between steps
                seen["rank0_moe"].add(step.rank0_moe)
                seen["experts"].add(step.experts)
                seen["a2a"].add(step.rank0_moe - step.experts)
                if step.rank0_busy is not None:
                    seen["rank0_busy"].add(step.rank0_busy)
                    seen["call"].add(seconds - step.rank0_busy)
        bar.update()


def small_group(model_dir: Path, engine_cfg: EngineConfig) -> RayExecutor:
    topo = TopologyConfig(num_attention_workers=1, num_expert_workers=2, strategy="SPREAD",
                          num_cpus_per_worker=0.25, attention_resources={"moe_attention": 1},
                          expert_resources={"moe_expert": 1})
    spec = build_group_spec(model_dir, ModelConfig.from_dir(model_dir), engine_cfg, topo,
                            worker=WorkerConfig(num_threads=1))
    return RayExecutor(spec, topo, control="channel")


def describe(group: RayExecutor) -> list[str]:
    nodes = {w["rank"]: w["node_id"][:8] for w in group.where()}
    threads = ray.get([w.__ray_call__.remote(lambda _w: torch.get_num_threads()) for w in group.workers])
    return [f"attention worker on node {nodes[0]}, expert workers on node(s) "
            f"{sorted({nodes[r] for r in nodes if r})}; the channel reaches them by "
            f"{', '.join(group.loops.broadcast.vias)} (rank order)",
            f"torch threads: single-process engine {torch.get_num_threads()}, workers {threads}"]


async def run_all(args, model_dir: Path) -> tuple[list[Result], dict[str, Samples], list[str]]:
    maker = BatchMaker(num_seqs=max(args.tokens), context=args.context, max_prefill=max(args.tokens))
    model = load_local_model(model_dir, torch.float32)
    timed = TimedDispatcher(model.dispatcher)
    model.dispatcher = timed
    local = LocalExecutor(ModelRunner(model, KVCache(model.cfg, maker.num_kv_blocks, BLOCK_SIZE)))
    group = small_group(model_dir, EngineConfig(block_size=BLOCK_SIZE, num_kv_blocks=maker.num_kv_blocks))
    info = describe(group)
    configs = [(kind, n) for kind in KINDS for n in args.tokens]
    results = [Result(kind, n) for kind, n in configs]

    async def phase(systems: dict, bar: tqdm) -> None:
        for res in results:
            bar.set_postfix_str(f"{res.kind} {res.num_tokens}")
            batches = (maker.step(res.kind, res.num_tokens),)
            await measure(res, batches, systems, timed, group, args.repeats, bar)

    noop = compiled = None
    try:
        for batch in tqdm(maker.setup(model.cfg.vocab_size), desc="KV prefill", unit="step"):
            await local.execute((batch,))
            await group.execute((batch,))
        over_ray = OverRayCalls(group)
        noop = NoOpFanOut()
        bare = {"same node": Samples(), "other node": Samples()}  # one no-op call, no arguments
        for _ in range(50):
            for index, where in enumerate(bare):  # actor 0 shares the driver's node, 1 does not
                t0 = time.perf_counter()
                await noop.single(index)
                bare[where].add(time.perf_counter() - t0)
        phases = 1 if args.no_cgraph else 3
        bar = tqdm(total=len(configs) * args.repeats * phases, desc="steps", unit="rep")
        distributed = {"ray": over_ray, LOW_LATENCY: LowLatencyGroup(over_ray, max(args.tokens)),
                       "channel": group, CHANNEL_LOW_LATENCY: LowLatencyGroup(group, max(args.tokens))}
        noop_channel = ChannelNoOpFanOut(noop)
        await phase({"local": local, **distributed, "ray no-op": noop, "channel no-op": noop_channel}, bar)
        noop_channel.teardown()
        # A sanity check that the paths did the same work: greedy tokens of the largest decode.
        batches = (maker.step("decode", max(args.tokens)),)
        want = await local.execute(batches)
        checks = {name: await system.execute(batches) == want for name, system in distributed.items()}
        if not args.no_cgraph:
            compiled = CompiledGroup(group)
            await phase({"local (cgraph alive)": local, "cgraph": compiled}, bar)
            checks["cgraph"] = await compiled.execute(batches) == want
            compiled.teardown()
            compiled = None  # torn down: the finally below must not tear it down again
            compiled = CompiledNoOpFanOut()
            await phase({"cgraph no-op": compiled}, bar)
        bar.close()
        info.append("greedy tokens equal the single-process engine's: "
                    + ", ".join(f"{s} {ok}" for s, ok in checks.items()))
    finally:
        for x in (compiled, noop):
            if x is not None:
                x.teardown()
        group.shutdown()
    return results, bare, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, TARGET_TOKENS])
    ap.add_argument("--context", type=int, default=64, help="prefilled tokens of each decode sequence")
    ap.add_argument("--repeats", type=int, help="default 40 (3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 repetitions")
    ap.add_argument("--no-cgraph", action="store_true", help="skip the Compiled Graph prototype")
    args = ap.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 40)
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"distributed step time: small model, fp32, 1 attention + 2 expert workers on two simulated nodes "
          f"(gloo, loopback); {args.repeats} repetitions; decode over {args.context}-token contexts")
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    t0 = time.perf_counter()
    cluster = start_cluster()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
            model_dir = write_small_checkpoint(Path(tmp) / "small")
            results, bare, info = asyncio.run(run_all(args, model_dir))
            num_layers = ModelConfig.from_dir(model_dir).num_hidden_layers
    finally:
        ray.shutdown()
        cluster.shutdown()
    for line in info:
        print(line)
    report(results, bare, num_layers)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s; "
          f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
