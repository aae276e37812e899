"""bench_elastic's load: a fixed number of greedy streams kept running, and what they saw.

Each of `num_streams` slots runs one request at a time and starts the next as soon as one ends,
so the engine always has that many sequences for as long as the load runs (bounded by
`deadline_s` and by the requests' own max_tokens). Everything is stamped with
time.perf_counter(), the clock the engine times its steps with:

- every token each slot received (tokens/s over an interval; a slot's first token after a kill);
- every engine step, as (end, seconds), from the engine's step listener (longest step during a
  change, p99 step before it). A step's seconds include any wait for the group's step lock, so
  a step held back by a rebalance switch or the re-forming of a scale is counted whole.

A slot that gets an error stops (a failed request is a finding, not something to retry); the
errors are kept for the report. The greedy tokens of each prompt are compared with the first
time that prompt ran: a cheap check that no change of the expert plane altered an output.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from dataclasses import dataclass

from cluster.engine import Engine
from cluster.engine_stats import EngineStats
from workers.model.sampling_params import SamplingParams

MAX_REQUESTS_PER_SLOT = 100_000  # the deadline ends a slot long before this; a bound all the same
WAIT_POLL_S = 0.02
TICK_S = 0.01  # the event-loop ticker's period


@dataclass(frozen=True)
class StepRecord:
    end: float  # perf_counter() when the engine reported the step
    seconds: float  # the step's duration, lock wait included

    @property
    def start(self) -> float:
        return self.end - self.seconds


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank: a value that was actually seen."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class SteadyLoad:
    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams,
                 num_streams: int, deadline_s: float) -> None:
        self.engine, self.prompts, self.params = engine, prompts, params
        self.num_streams = num_streams
        self.deadline = time.perf_counter() + deadline_s
        self.token_times: list[list[float]] = [[] for _ in range(num_streams)]
        self.steps: list[StepRecord] = []
        self.errors: list[str] = []
        self.num_finished = 0
        self.num_mismatches = 0  # completions whose greedy tokens differ from that prompt's first
        self._first_tokens: dict[int, list[int]] = {}
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        # (when, how late) of each wake-up of a ticker: a late one means something held the event
        # loop (a blocking call in the driver), which no step can tell apart from a slow worker.
        self.loop_lags: list[tuple[float, float]] = []
        engine.step_listeners.append(self._on_step)

    def _on_step(self, stats: EngineStats) -> None:
        self.steps.append(StepRecord(time.perf_counter(), stats.last_step_seconds))

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._slot(i)) for i in range(self.num_streams)]
        self._ticker = asyncio.ensure_future(self._tick())

    async def stop(self) -> None:
        self._stopping = True
        for task in [*self._tasks, self._ticker]:
            task.cancel()  # closing a stream aborts its request
        await asyncio.gather(*self._tasks, self._ticker, return_exceptions=True)
        self.engine.step_listeners.remove(self._on_step)

    async def _slot(self, slot: int) -> None:
        for n in range(MAX_REQUESTS_PER_SLOT):
            if self._stopping or time.perf_counter() > self.deadline:
                return
            index = (slot + n * self.num_streams) % len(self.prompts)
            tokens, last = [], None
            async for out in self.engine.generate(f"s{slot}-{n}", self.prompts[index], self.params):
                if out.token_ids:
                    self.token_times[slot].extend([time.perf_counter()] * len(out.token_ids))
                    tokens += out.token_ids
                last = out
            if last is None or last.finish_reason != "length":
                reason = None if last is None else (last.error or last.finish_reason)
                self.errors.append(f"slot {slot} request {n}: {reason}")
                return
            self.num_finished += 1
            first = self._first_tokens.setdefault(index, tokens)
            self.num_mismatches += first != tokens

    async def _tick(self) -> None:
        while not self._stopping and time.perf_counter() < self.deadline:
            t0 = time.perf_counter()
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            self.loop_lags.append((now, now - t0 - TICK_S))

    def longest_loop_lag(self, t0: float, t1: float) -> float:
        """The longest the event loop was held (beyond a tick) by something ending in [t0, t1]."""
        return max((lag for t, lag in self.loop_lags if t0 <= t <= t1), default=math.nan)

    def tokens_per_s(self, t0: float, t1: float) -> float:
        n = sum(1 for times in self.token_times for t in times if t0 <= t < t1)
        return n / (t1 - t0)

    def steps_in(self, t0: float, t1: float) -> list[float]:
        """Durations of the steps that ran wholly inside [t0, t1]."""
        return [s.seconds for s in self.steps if t0 <= s.start and s.end <= t1]

    def steps_overlapping(self, t0: float, t1: float) -> list[StepRecord]:
        """The steps that ran at any moment of [t0, t1]."""
        return [s for s in self.steps if s.start <= t1 and s.end >= t0]

    def steps_after(self, t: float, n: int) -> list[StepRecord]:
        """The first `n` steps that started after `t`."""
        return [s for s in self.steps if s.start > t][:n]

    def first_tokens_after(self, t: float) -> list[float | None]:
        """Per slot, when its first token after `t` came (None: not yet)."""
        out: list[float | None] = []
        for times in self.token_times:  # each slot's times only ever grow
            i = bisect.bisect_right(times, t)
            out.append(times[i] if i < len(times) else None)
        return out

    async def until_every_live_slot_has_a_token_after(self, t: float, timeout_s: float) -> bool:
        """Waits (bounded) until each running slot got a token after `t`; False on time-out."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            firsts = self.first_tokens_after(t)
            if all(f is not None for f, task in zip(firsts, self._tasks, strict=True) if not task.done()):
                return True
            await asyncio.sleep(WAIT_POLL_S)
        return False
