"""bench_elastic's measurements on a running group under steady load: an interval read by the
expert plane, a change of the plane timed against the steps around it, and a worker killed and
recovered. See tests/bench/bench_elastic.py's docstring for what each figure means."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from dataclasses import dataclass

from cluster.expert_plane import ExpertPlane
from cluster.plane_event import PlaneEvent
from cluster.recovery_event import RecoveryEvent
from tests.bench.elastic_load import SteadyLoad, percentile
from workers.group.worker_stats import WorkerStats

NUM_NEXT_STEPS = 4  # shown after a change's own steps: does the new placement's first step cost more?


class WorkerTally:
    """Tokens each expert worker's own copies received, per layer: the measured imbalance,
    beside the plane's (which splits a replicated expert's tokens evenly by assumption)."""

    def __init__(self, first_expert_rank: int) -> None:
        self.first_expert_rank = first_expert_rank
        self.tokens: dict[tuple[int, int], int] = {}  # (worker, layer) → tokens
        self.workers: set[int] = set()

    def __call__(self, stats: list[WorkerStats]) -> None:
        for ws in stats:
            if ws.kind == "expert":
                worker = ws.rank - self.first_expert_rank
                self.workers.add(worker)
                for (layer, _expert), n in ws.dispatch.tokens_per_expert.items():
                    self.tokens[worker, layer] = self.tokens.get((worker, layer), 0) + n

    def reset(self) -> None:
        self.tokens.clear()
        self.workers.clear()

    def imbalance(self) -> float:
        layers = {layer for _, layer in self.tokens}
        busiest = sum(max(self.tokens.get((w, layer), 0) for w in self.workers) for layer in layers)
        mean = sum(sum(self.tokens.get((w, layer), 0) for w in self.workers) / len(self.workers)
                   for layer in layers)
        return busiest / mean if mean > 0 else float("nan")


@dataclass(frozen=True)
class Interval:
    """What one interval of steady load showed."""

    tokens_per_s: float
    imbalance: float  # the plane's: max/mean tokens per expert worker over its window
    measured_imbalance: float  # the workers' own counters
    p50_step: float
    p99_step: float
    num_steps: int
    loop_lag: float  # the longest the driver's event loop was held
    load: dict  # tokens per (layer, expert) over the interval


@dataclass(frozen=True)
class Change:
    event: PlaneEvent
    p99_before: float
    during: tuple[float, ...]  # the steps that overlapped the change, in order (seconds)
    next: tuple[float, ...]  # the few steps right after those
    loop_lag: float  # the longest the driver's event loop was held meanwhile (a blocking call)

    @property
    def longest_step(self) -> float:
        return max(self.during, default=float("nan"))


@dataclass(frozen=True)
class Recovered:
    event: RecoveryEvent | None  # None: no recovery within the time-out
    stall_max: float  # kill → first token after the fault was seen, the slowest stream
    stall_median: float


async def observe(plane: ExpertPlane, tally: WorkerTally, load: SteadyLoad, seconds: float,
                  poll_s: float) -> Interval:
    await plane.tick()  # drains the counters (and clears the window after a change of shape)
    plane.window.clear()
    tally.reset()
    t0 = time.perf_counter()
    for _ in range(max(1, round(seconds / poll_s))):
        await asyncio.sleep(poll_s)
        await plane.tick()
    t1 = time.perf_counter()
    steps = load.steps_in(t0, t1)
    return Interval(load.tokens_per_s(t0, t1), plane.imbalance(), tally.imbalance(), percentile(steps, 50),
                    percentile(steps, 99), len(steps), load.longest_loop_lag(t0, t1), plane.window.load())


async def timed_change(load: SteadyLoad, change, p99_before: float, timeout_s: float) -> Change:
    t0 = time.perf_counter()
    event = await asyncio.wait_for(change, timeout_s)
    t1 = time.perf_counter()
    await asyncio.sleep(1.0)  # a step held back by the switch ends after it, and a few more follow
    return Change(event, p99_before, tuple(s.seconds for s in load.steps_overlapping(t0, t1)),
                  tuple(s.seconds for s in load.steps_after(t1, NUM_NEXT_STEPS)),
                  load.longest_loop_lag(t0, time.perf_counter()))


def pid_of(group, rank: int) -> int:
    (info,) = [w for w in group.where() if w["rank"] == rank]
    return info["pid"]


async def kill_and_recover(engine, group, load: SteadyLoad, rank: int, timeout_s: float) -> Recovered:
    seen: list[tuple[float, RecoveryEvent]] = []

    def listener(event: RecoveryEvent) -> None:
        seen.append((time.perf_counter(), event))

    engine.recovery.listeners.append(listener)
    try:
        pid = pid_of(group, rank)
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        deadline = t_kill + timeout_s
        while not seen and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        if not seen:
            return Recovered(None, float("nan"), float("nan"))
        emitted, event = seen[0]
        fault_seen = emitted - event.seconds  # no token can come between this and the recovery's end
        left = max(1.0, deadline - time.perf_counter())
        await load.until_every_live_slot_has_a_token_after(fault_seen, left)
        stalls = [t - t_kill for t in load.first_tokens_after(fault_seen) if t is not None]
        return Recovered(event, max(stalls, default=float("nan")),
                         statistics.median(stalls) if stalls else float("nan"))
    finally:
        engine.recovery.listeners.remove(listener)


async def until_grown_back(group, timeout_s: float) -> bool:
    deadline = time.perf_counter() + timeout_s
    while group.background and time.perf_counter() < deadline:
        await asyncio.wait(set(group.background), timeout=deadline - time.perf_counter())
    return not group.background
