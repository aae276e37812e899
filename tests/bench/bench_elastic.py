"""The elastic expert plane under load (issue 16's benchmark): prints figures and ratios.

Run from the repository root: `python -m tests.bench.bench_elastic` (`--quick`: shorter
intervals, a smoke run). Not a test: nothing here asserts a time; every ratio is against a
reference measured in the same run, on the same group, under the same load.

Set-up: the demo checkpoint with `--router-skew` (default 2: each layer's two hot experts get
about three quarters of the picks), a Ray group of 1 attention + 4 expert workers on this
machine (gloo, one torch thread each), and 16 greedy streams kept running the whole time
(tests/bench/elastic_load.py): a slot starts a new request as soon as its last one ends.

In order, on that one group:
1. Rebalance. A fixed interval of load, read by the expert plane (cluster/expert_plane.py)
   every `poll_s`: imbalance (max/mean tokens per expert worker over its window, as the policy
   sees it, and as the workers' own counters say) and output tokens/s. Then the policy's
   proposal for that window's load (replicas of the hottest experts allowed) applied with
   rebalance_to while the streams run (then back to the start's placement, then to the
   proposal again: three switches), then the same interval again.
2. Step times around each switch: the longest step that overlapped it over the p99 step of
   the interval before the first (a step's time includes any wait for the step lock); the
   median and the worst of the three.
3. Scale-up 4 → 5 and scale-down 5 → 4: each one's pause (steps held while the group
   re-forms), its whole duration, and its longest step over the p99 step just before it.
4. Recovery: SIGKILL of one expert worker; the RecoveryEvent's seconds and the stall every
   stream saw (kill → its first token after the fault was seen), for the one-worker repair,
   then, once the pool has grown back, for the same kill with `group.repair_alone = False`
   (every fault restarts the whole group: the behaviour before issue 16).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from cluster.distributed_engine import build_distributed_engine
from cluster.elastic_config import ElasticConfig, RebalanceConfig
from cluster.engine_config import EngineConfig
from cluster.expert_plane import ExpertPlane
from cluster.plane_actions import rebalance_to, scale_to
from cluster.plane_event import PlaneEvent
from cluster.rebalance_policy import propose_rebalance
from cluster.tokenizer import Tokenizer
from cluster.topology import TopologyConfig
from gateway.demo_checkpoint import write_demo_checkpoint
from gateway.demo_corpus import demo_corpus
from tests.bench.elastic_load import SteadyLoad
from tests.bench.elastic_phases import (
    WorkerTally,
    kill_and_recover,
    observe,
    timed_change,
    until_grown_back,
)
from tests.bench.elastic_report import Results, report
from workers.model.sampling_params import SamplingParams

NUM_STREAMS = 16
NUM_EXPERT_WORKERS = 4
NUM_REBALANCES = 3  # odd: the group ends on the proposal
KILLED_RANK = 2  # expert worker 1 (rank 0 is the attention worker)
PARAMS = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
ENGINE_CFG = EngineConfig(max_num_seqs=32, max_num_batched_tokens=256, block_size=16)
# The plane only reads here (both its policies are off): the benchmark makes each change itself.
PLANE_CFG = ElasticConfig(rebalance=RebalanceConfig(window_s=120.0))
# Any gain will do: the benchmark measures the move the policy would make for this load.
PROPOSAL_CFG = RebalanceConfig(threshold=1.0, min_gain=0.0, extra_copies_per_layer=2, min_tokens=1)


@dataclass(frozen=True)
class Timing:
    interval_s: float  # each measured interval of load (before and after the rebalance)
    ref_s: float  # the shorter interval before a scale, for its p99 step
    settle_s: float  # after every change, before measuring again
    poll_s: float  # the expert plane's poll while measuring
    change_timeout_s: float  # any one change or recovery (a bound, never expected)
    deadline_s: float  # the streams stop by then whatever happens


FULL = Timing(interval_s=20.0, ref_s=8.0, settle_s=3.0, poll_s=1.0, change_timeout_s=120.0, deadline_s=600.0)
QUICK = Timing(interval_s=5.0, ref_s=3.0, settle_s=1.0, poll_s=0.5, change_timeout_s=120.0, deadline_s=300.0)


async def measure(engine, group, prompts: list[list[int]], t: Timing) -> Results:
    plane = ExpertPlane(group, PLANE_CFG)
    tally = WorkerTally(group.num_attention_workers)
    plane.stats_listeners.append(tally)
    events: list[PlaneEvent] = []
    group.plane_listeners.append(events.append)
    load = SteadyLoad(engine, prompts, PARAMS, NUM_STREAMS, t.deadline_s)
    load.start()
    try:
        say(f"warming up: {NUM_STREAMS} streams")
        await asyncio.sleep(2 * t.settle_s)
        say(f"before the rebalance: {t.interval_s:g} s of load")
        before = await observe(plane, tally, load, t.interval_s, t.poll_s)
        proposal = propose_rebalance(group.placement, before.load, PROPOSAL_CFG)
        if proposal is None:
            raise RuntimeError(f"the policy proposed no move for this load ({sum(before.load.values()):.0f} "
                               f"tokens, imbalance {before.imbalance:.2f})")
        say(f"rebalance ×{NUM_REBALANCES}: imbalance {proposal.imbalance_before:.2f} → "
            f"{proposal.imbalance_after:.2f} foreseen, back, and again")
        # One switch's longest step is one sample: the same switch there, back and there again gives
        # three (each against the same p99, the interval's before the first).
        forth = (proposal.placement, proposal.imbalance_before, proposal.imbalance_after)
        back = (group.placement, proposal.imbalance_after, proposal.imbalance_before)
        rebalances = []
        for placement, imbalance_before, imbalance_after in itertools.islice(itertools.cycle((forth, back)),
                                                                             NUM_REBALANCES):
            change = rebalance_to(group, placement, imbalance_before=imbalance_before,
                                  imbalance_after=imbalance_after)
            rebalances.append(await timed_change(load, change, before.p99_step, t.change_timeout_s))
            await asyncio.sleep(t.settle_s)
        say(f"after the rebalance: {t.interval_s:g} s of load")
        after = await observe(plane, tally, load, t.interval_s, t.poll_s)
        say(f"scale-up {NUM_EXPERT_WORKERS} → {NUM_EXPERT_WORKERS + 1}")
        up = await timed_change(load, scale_to(group, NUM_EXPERT_WORKERS + 1, load=after.load or None),
                                after.p99_step, t.change_timeout_s)
        await asyncio.sleep(t.settle_s)
        five = await observe(plane, tally, load, t.ref_s, t.poll_s)
        say(f"scale-down {NUM_EXPERT_WORKERS + 1} → {NUM_EXPERT_WORKERS}")
        down = await timed_change(load, scale_to(group, NUM_EXPERT_WORKERS, load=five.load or None),
                                  five.p99_step, t.change_timeout_s)
        await asyncio.sleep(t.settle_s)
        say(f"SIGKILL expert rank {KILLED_RANK}: repaired alone")
        num_events = len(events)
        repair = await kill_and_recover(engine, group, load, KILLED_RANK, t.change_timeout_s)
        say("waiting for the pool to grow back")
        if not await until_grown_back(group, t.change_timeout_s):
            say(f"the pool has not grown back within {t.change_timeout_s:g} s; going on")
        grow_back = next((e for e in events[num_events:] if e.kind == "scale_up"), None)
        await asyncio.sleep(t.settle_s)
        say(f"SIGKILL expert rank {KILLED_RANK}: the whole group restarts")
        group.repair_alone = False
        restart = await kill_and_recover(engine, group, load, KILLED_RANK, t.change_timeout_s)
    finally:
        await load.stop()
        await engine.shutdown()
    return Results(before, proposal, tuple(rebalances), after, up, down, repair, grow_back, restart, load)


def demo_prompts(model_dir: Path, num_prompts: int = 64, max_len: int = 40) -> list[list[int]]:
    """Demo-corpus lines the tokenizer was not trained on; each starts with BOS (the skew's direction)."""
    tok = Tokenizer.from_dir(model_dir)
    ids = [tok.encode(line)[:max_len] for line in demo_corpus(num_lines=num_prompts, seed=7)]
    return [p for p in ids if len(p) >= 4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short intervals: a smoke run")
    parser.add_argument("--router-skew", type=float, default=2.0)
    args = parser.parse_args()
    timing = QUICK if args.quick else FULL
    torch.set_num_threads(1)  # the driver only schedules; the workers get one thread each
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_demo_checkpoint(Path(tmp) / "demo", router_skew=args.router_skew, progress=False)
        prompts = demo_prompts(model_dir)
        ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
        try:
            topology = TopologyConfig(num_attention_workers=1, num_expert_workers=NUM_EXPERT_WORKERS,
                                      num_cpus_per_worker=0.1)
            say("starting the group")
            engine, group = build_distributed_engine(model_dir, ENGINE_CFG, topology)
            try:
                results = asyncio.run(measure(engine, group, prompts, timing))
            finally:
                group.shutdown()
        finally:
            ray.shutdown()
    report(results, f"router skew {args.router_skew:g}, 1 attention + {NUM_EXPERT_WORKERS} expert workers, "
                    f"{NUM_STREAMS} greedy streams (max_tokens {PARAMS.max_tokens})")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


if __name__ == "__main__":
    main()
