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
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from cluster.dispatch_mode import with_dispatch_mode
from cluster.distributed_engine import build_group_spec
from cluster.engine_config import EngineConfig
from cluster.executor import LocalExecutor
from cluster.ray_executor import RayExecutor
from cluster.step_loops import open_step_loops
from cluster.topology import TopologyConfig
from cluster.worker_config import WorkerConfig
from tests.bench.bench_engine import write_small_checkpoint
from tests.bench.bench_util import Samples, print_table
from workers.group.step_link import StepLink
from workers.group.step_loop import serve_steps
from workers.group.step_message import StepMessage, StepRoute
from workers.model.batch_spec import ScheduledBatch, ScheduledSeq
from workers.model.kv_cache import KVCache
from workers.model.loader import load_local_model
from workers.model.runner import ModelRunner
from workers.model.sampling_params import SamplingParams
from workers.weights.config import ModelConfig

KINDS = ("decode", "prefill")
TARGET_RATIO = 1.5  # distributed / single-process step time at TARGET_TOKENS, an upper bound
TARGET_TOKENS = 64
BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
ATTENTION_NODE, EXPERT_NODE = {"moe_attention": 2}, {"moe_expert": 4}


def p90(s: Samples) -> float:
    return statistics.quantiles(s.values, n=10)[-1]


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


# -- the cluster --------------------------------------------------------------------------


def start_cluster():
    from ray.cluster_utils import Cluster

    # ray.init(address="127.0.0.1:port") rewrites loopback to the machine's outward address;
    # this benchmark stays on loopback (as tests/integration/test_multinode_cluster.py does).
    ray._private.services.resolve_ip_for_localhost = lambda host: host
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "resources": ATTENTION_NODE,
        "include_dashboard": False})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources=EXPERT_NODE)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


@ray.remote(num_cpus=0, max_concurrency=2)  # threaded, like the workers
class NoOp:
    def __init__(self) -> None:
        self.link: StepLink | None = None

    def ping(self, *_args) -> None:
        return None

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def connect_steps(self, route: StepRoute) -> None:  # as GroupMember's: a step loop of no-ops
        self.link = StepLink.connect(route)

    def serve_steps(self) -> int:
        return serve_steps(self.link, lambda _message: None)


def _take_busy(worker) -> float:
    busy, worker.busy_seconds = worker.busy_seconds, 0.0
    return busy


@dataclass(frozen=True)
class StepStats:
    """What the workers saw in one step (seconds)."""

    rank0_busy: float | None  # the attention worker inside execute; None where workers do not report it
    rank0_moe: float  # the attention worker's dispatch + combine, all layers
    experts: float  # the busiest expert worker's grouped experts, all layers


def drain_stats(group: RayExecutor) -> StepStats:
    stats = group.dispatch_stats()
    # WorkerStats wraps the dispatcher's snapshot; older workers return the snapshot bare.
    snap = getattr(stats[0], "dispatch", stats[0])
    if all(hasattr(s, "busy_seconds") for s in stats):
        rank0_busy = stats[0].busy_seconds
        busy = [s.busy_seconds for s in stats[group.num_attention_workers:]]
    else:
        rank0_busy = None
        busy = ray.get([w.__ray_call__.remote(_take_busy) for w in group.experts])
    return StepStats(rank0_busy, snap.dispatch_seconds + snap.combine_seconds, max(busy))


class OverRayCalls:
    """The group stepped by the reference control path: one Ray actor call per worker per step."""

    def __init__(self, group: RayExecutor) -> None:
        self.group = group

    async def execute(self, batches: tuple[ScheduledBatch, ...]):
        return await self.group.execute_over_ray(batches)


class LowLatencyGroup:
    """An executor with the engine's per-step rule applied: decode steps up to the threshold
    dispatch through fixed-capacity buffers (cluster/dispatch_mode.py)."""

    def __init__(self, group, max_tokens: int) -> None:
        self.group, self.max_tokens = group, max_tokens

    async def execute(self, batches: tuple[ScheduledBatch, ...]):
        return await self.group.execute(with_dispatch_mode(batches, self.max_tokens))


def _expert_step(worker, _step: int) -> int:
    return worker.execute()


class CompiledGroup:
    """Prototype: RayExecutor.execute as a Ray Compiled Graph (the control path only).

    The same actors and the same per-worker calls, compiled once: each step writes the
    batches into shared-memory channels instead of submitting one Ray task per worker.
    Expert workers take the step number, so their input is a few bytes.
    """

    def __init__(self, group: RayExecutor) -> None:
        from ray.dag import InputNode, MultiOutputNode

        a = group.num_attention_workers
        with InputNode() as inp:  # inp[0]: step number, inp[1 + i]: attention worker i's batch
            outs = [w.execute.bind(inp[1 + i]) for i, w in enumerate(group.attention)]
            outs += [w.__ray_call__.bind(_expert_step, inp[0]) for w in group.experts]
            dag = MultiOutputNode(outs)
        self.num_attention_workers = a
        self.dag = dag.experimental_compile(enable_asyncio=True)
        self.num_steps = 0

    async def execute(self, batches: tuple[ScheduledBatch, ...]):
        self.num_steps += 1
        futures = await self.dag.execute_async(self.num_steps, *batches)  # one per output
        results = await asyncio.gather(*futures)
        return tuple(results[: self.num_attention_workers])

    def teardown(self) -> None:
        self.dag.teardown()


class NoOpFanOut:
    """Three no-op actors placed like the group's workers: the bare control path."""

    def __init__(self) -> None:
        self.actors = [NoOp.options(resources={"moe_attention": 0.5}).remote()]
        self.actors += [NoOp.options(resources={"moe_expert": 0.5}).remote() for _ in range(2)]
        ray.get([x.ping.remote() for x in self.actors])

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> None:
        first, *rest = self.actors
        await asyncio.gather(first.ping.remote(batches[0]), *(x.ping.remote() for x in rest))

    async def single(self, index: int) -> None:
        await self.actors[index].ping.remote()

    def teardown(self) -> None:
        for x in self.actors:
            ray.kill(x)


class ChannelNoOpFanOut:
    """The same three no-op actors, stepped through a step broadcast: the bare channel."""

    def __init__(self, noop: NoOpFanOut) -> None:
        nodes = ray.get([x.node.remote() for x in noop.actors])
        self.loops = open_step_loops(noop.actors, nodes, 1, timeout_s=60)

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> None:
        broadcast = self.loops.broadcast
        seq = broadcast.publish(StepMessage(batches[0].low_latency_tokens, batches))
        await asyncio.gather(*(broadcast.result(rank, seq) for rank in range(len(broadcast.vias))))

    def teardown(self) -> None:
        self.loops.close()


class CompiledNoOpFanOut(NoOpFanOut):
    def __init__(self) -> None:
        from ray.dag import InputNode, MultiOutputNode

        super().__init__()
        first, *rest = self.actors
        with InputNode() as inp:  # as CompiledGroup: inp[0] a step number, inp[1] the batch
            dag = MultiOutputNode([first.ping.bind(inp[1])] + [x.ping.bind(inp[0]) for x in rest])
        self.dag = dag.experimental_compile(enable_asyncio=True)

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> None:
        await asyncio.gather(*await self.dag.execute_async(0, *batches))

    def teardown(self) -> None:
        self.dag.teardown()
        super().teardown()


# -- measurement --------------------------------------------------------------------------

LOCAL = ("local", "local (cgraph alive)")
LOW_LATENCY = "ray low-latency"
CHANNEL_LOW_LATENCY = "channel low-latency"
DISTRIBUTED = ("ray", LOW_LATENCY, "channel", CHANNEL_LOW_LATENCY, "cgraph")
# Issue 15's goals for the low-latency path, distributed / single-process step time by tokens.
LOW_LATENCY_TARGETS = {1: 1.2, 64: 1.05}
# Per distributed step: rank 0's time inside execute and its dispatch + combine, the busiest
# expert worker's grouped experts, and two differences taken within the same step:
# call = step − rank 0's execute, a2a = rank 0's dispatch + combine − the busiest experts.
WORKER_FIELDS = ("rank0_busy", "rank0_moe", "experts", "call", "a2a")


@dataclass
class Result:
    kind: str
    num_tokens: int
    times: dict[str, Samples] = field(default_factory=dict)  # system → step seconds
    stats: dict[str, dict[str, Samples]] = field(default_factory=dict)  # system → "local_moe"/WORKER_FIELDS

    def stat(self, system: str, name: str) -> float | None:
        s = self.stats[system][name]
        return s.median if s.values else None


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


# -- report -------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def report(results: list[Result], bare: dict[str, Samples], num_layers: int) -> None:
    rows = []
    for r in results:
        base = r.times["local"].median
        for system in ("local", "ray", LOW_LATENCY, "channel", CHANNEL_LOW_LATENCY, "local (cgraph alive)",
                       "cgraph"):
            if system not in r.times:
                continue
            s = r.times[system]
            extra = s.median - base
            added = ("", "") if system == "local" else (ms(extra), ms(extra / num_layers))
            rows.append((r.kind, r.num_tokens, system, ms(s.median), ms(p90(s)), f"{s.median / base:.2f}",
                         *added))
    print()
    print_table(("kind", "tokens", "system", "median ms", "p90 ms", "× local", "+ms/step",
                 f"+ms/MoE layer (L={num_layers})"), rows)
    print("\nbare Ray round trip (one no-op actor call, no arguments, before any compiled graph): "
          + "; ".join(f"{where} median {ms(s.median)} ms, p90 {ms(p90(s))} ms" for where, s in bare.items()))

    paths = [(r, p) for r in results for p in DISTRIBUTED if p in r.times]
    print("\nper MoE layer (medians, ms):")
    rows = []
    for r, path in paths:
        moe, experts, a2a = (r.stat(path, f) / num_layers for f in ("rank0_moe", "experts", "a2a"))
        rows.append((r.kind, r.num_tokens, path, ms(r.stat("local", "local_moe") / num_layers), ms(moe),
                     ms(experts), ms(a2a)))
    print_table(("kind", "tokens", "path", "local MoE", "rank0 dispatch+combine", "remote experts",
                 "a2a+wait"), rows)
    print("  local MoE: dispatch + experts + combine in the single process; rank0 dispatch+combine: the\n"
          "  attention worker's, which wait for the remote experts; remote experts: the busiest expert\n"
          "  worker's grouped experts; a2a+wait: rank0 dispatch+combine − remote experts, step by step\n"
          "  (three gloo all-to-alls per layer: counts, rows out, rows back, and the wake-ups around them).")

    print(f"\nper step (medians, ms): measured + ≈ control + L × a2a+wait + L × Δexperts + Δnon-MoE "
          f"(L={num_layers})")
    rows = []
    for r, path in paths:
        local, local_moe = r.times["local"].median, r.stat("local", "local_moe")
        w = {f: r.stat(path, f) for f in WORKER_FIELDS}
        busy = w["rank0_busy"]
        parts = {"call": w["call"], "a2a": w["a2a"], "experts": w["experts"] - local_moe,
                 "rest": None if busy is None else (busy - w["rank0_moe"]) - (local - local_moe)}
        known = [v for v in parts.values() if v is not None]
        measured = r.times[path].median - local
        share = f"{w['call'] / measured:.0%}" if w["call"] is not None and measured > 0 else "n/a"
        noop = r.times.get(f"{path} no-op")
        rows.append((r.kind, r.num_tokens, path, ms(noop.median) if noop else "n/a",
                     *("n/a" if v is None else ms(v) for v in parts.values()), ms(sum(known)), ms(measured),
                     share))
    print_table(("kind", "tokens", "path", "no-op fan-out", "control", "L×a2a+wait", "L×Δexperts",
                 "Δnon-MoE", "sum", "measured +", "control share"), rows)
    print("  no-op fan-out: the same three-actor step to no-ops (batch to the first); control: step − the\n"
          "  attention worker's time inside execute (the Ray call, or the channel's send, read and reply);\n"
          "  Δexperts: remote experts − local MoE; Δnon-MoE: the attention worker's non-MoE time\n"
          "  (attention, router, LM head, sampling) − the single process's; control share: control /\n"
          "  measured +.\n"
          "  Medians of parts need not add up to the median of the whole.")

    print(f"\ntarget: distributed / single-process step time <= {TARGET_RATIO} "
          f"at {TARGET_TOKENS} tokens per step")
    rows = []
    for r in results:
        if r.num_tokens != TARGET_TOKENS:
            continue
        for system in DISTRIBUTED:
            if system in r.times:
                ratio = r.times[system].median / r.times["local"].median
                rows.append((r.kind, system, f"{ratio:.2f}", f"<= {TARGET_RATIO}",
                             "PASS" if ratio <= TARGET_RATIO else "MISS"))
    if rows:
        print_table(("kind", "path", "ratio", "goal", "verdict"), rows)
    else:
        print(f"  (not measured: add {TARGET_TOKENS} to --tokens)")

    print("\nlow-latency vs exact dispatch, decode steps (distributed / single-process step time):")
    rows = []
    for r in results:
        if r.kind != "decode" or LOW_LATENCY not in r.times:
            continue
        local = r.times["local"].median
        for control, exact_system, low_system in (("ray", "ray", LOW_LATENCY),
                                                  ("channel", "channel", CHANNEL_LOW_LATENCY)):
            exact, low = r.times[exact_system].median / local, r.times[low_system].median / local
            goal = LOW_LATENCY_TARGETS.get(r.num_tokens)
            verdict = "" if goal is None else ("PASS" if low <= goal else "MISS")
            rows.append((r.num_tokens, control, f"{exact:.2f}", f"{low:.2f}", f"{exact / low:.2f}",
                         "" if goal is None else f"<= {goal}", verdict))
    print_table(("tokens", "control", "exact ×local", "low-latency ×local", "exact / low-latency", "goal",
                 "verdict"), rows)

    print("\nchannel vs Ray call, the same workers in the same phase (step time; ratios of medians):")
    rows = []
    for r in results:
        local = r.times["local"].median
        for dispatch, ray_system, channel_system in (("exact", "ray", "channel"),
                                                     ("low-latency", LOW_LATENCY, CHANNEL_LOW_LATENCY)):
            if r.kind != "decode" and dispatch == "low-latency":
                continue  # prefill steps always dispatch exact: the same numbers again
            ray_s, channel_s = r.times[ray_system].median, r.times[channel_system].median
            rows.append((r.kind, r.num_tokens, dispatch, ms(ray_s), ms(channel_s), ms(ray_s - channel_s),
                         f"{ray_s / local:.2f}", f"{channel_s / local:.2f}", f"{ray_s / channel_s:.2f}"))
    print_table(("kind", "tokens", "dispatch", "ray ms", "channel ms", "saved ms", "ray ×local",
                 "channel ×local", "ray / channel"), rows)


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
