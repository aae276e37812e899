"""bench_elastic's bookkeeping without Ray (tests/bench/elastic_*.py): the steady load over a fake
engine, the per-worker tally, and the report's verdicts. The benchmark itself needs a Ray group
and minutes; these keep what it computes from those runs honest."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

from tests.bench.elastic_load import SteadyLoad, StepRecord, percentile
from tests.bench.elastic_phases import WorkerTally
from tests.bench.elastic_report import at_least, at_most, recovery_rows, step_row
from workers.model.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


class FakeEngine:
    """Streams `max_tokens` tokens per request, one "step" each; prompt `bad` ends in an error."""

    def __init__(self, bad: list[int] | None = None) -> None:
        self.step_listeners: list = []
        self.bad = bad
        self.num_requests = 0

    async def generate(self, request_id, prompt, params):
        self.num_requests += 1
        if prompt == self.bad:
            yield SimpleNamespace(token_ids=(), finish_reason="error", error="engine unavailable")
            return
        for i in range(params.max_tokens):
            await asyncio.sleep(0.001)
            for listener in self.step_listeners:
                listener(SimpleNamespace(last_step_seconds=0.001))
            last = i == params.max_tokens - 1
            yield SimpleNamespace(token_ids=(sum(prompt) + i,), finish_reason="length" if last else None,
                                  error=None)


def run_load(engine: FakeEngine, prompts: list[list[int]], num_streams: int, seconds: float) -> SteadyLoad:
    async def main() -> SteadyLoad:
        load = SteadyLoad(engine, prompts, PARAMS, num_streams, deadline_s=30.0)
        load.start()
        await asyncio.sleep(seconds)
        await load.stop()
        return load
    return asyncio.run(main())


def test_slots_restart_requests_and_record_tokens_and_steps():
    engine = FakeEngine()
    load = run_load(engine, [[1, 2], [3], [4, 5, 6]], num_streams=2, seconds=0.2)
    assert load.num_finished > 2  # each slot went on to new requests
    assert not load.errors and load.num_mismatches == 0  # the same prompt gave the same tokens
    assert not engine.step_listeners  # stop() takes its listener away
    for times in load.token_times:
        assert times and times == sorted(times)
    t0, t1 = load.token_times[0][0], load.token_times[0][-1]
    assert load.tokens_per_s(t0, t1) > 0
    firsts = load.first_tokens_after(t0)
    assert firsts[0] == load.token_times[0][1] and all(f is None or f > t0 for f in firsts)
    assert load.first_tokens_after(t1 + 10) == [None, None]
    assert len(load.steps) >= sum(len(t) for t in load.token_times) - 2


def test_a_slot_stops_at_its_first_error():
    engine = FakeEngine(bad=[9])
    load = run_load(engine, [[1], [9]], num_streams=2, seconds=0.1)
    assert load.errors == ["slot 1 request 0: engine unavailable"]
    assert load.num_finished > 0  # slot 0 kept going


def test_step_windows_and_percentile():
    load = SteadyLoad(FakeEngine(), [[1]], PARAMS, num_streams=1, deadline_s=1.0)
    load.steps = [StepRecord(1.0, 0.5), StepRecord(2.0, 0.5), StepRecord(3.5, 1.0)]
    assert load.steps_in(0.0, 2.0) == [0.5, 0.5]
    assert [s.end for s in load.steps_overlapping(1.8, 2.6)] == [2.0, 3.5]  # the last started at 2.5
    assert [s.end for s in load.steps_after(1.6, 5)] == [3.5]
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert math.isnan(percentile([], 99))


def stats(rank: int, kind: str, tokens: dict) -> SimpleNamespace:
    return SimpleNamespace(rank=rank, kind=kind, dispatch=SimpleNamespace(tokens_per_expert=tokens))


def test_worker_tally_imbalance_is_busiest_over_mean_per_layer():
    tally = WorkerTally(first_expert_rank=1)
    # Layer 0: workers hold 30 and 10 tokens; layer 1: 20 and 20. (30 + 20) / (20 + 20) = 1.25.
    tally([stats(0, "attention", {(0, 0): 999}),
           stats(1, "expert", {(0, 0): 20, (0, 1): 10, (1, 0): 20}),
           stats(2, "expert", {(0, 2): 10, (1, 3): 20})])
    assert tally.imbalance() == 1.25
    tally.reset()
    assert math.isnan(tally.imbalance())


def test_verdicts_against_the_issue_targets():
    assert (at_most(1.5, 1.5), at_most(1.6, 1.5), at_most(math.nan, 1.5)) == ("met", "not met", "n/a")
    assert (at_least(3.0, 3.0), at_least(2.9, 3.0)) == ("met", "not met")
    assert step_row("x", 0.150, 0.100, target=True).verdict == "met"
    assert step_row("x", 0.151, 0.100, target=True).verdict == "not met"
    repair, speedup = recovery_rows("recovery", repair_s=1.0, restart_s=2.5)
    assert (repair.verdict, speedup.verdict, speedup.value) == ("met", "not met", "2.50×")
