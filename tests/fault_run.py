"""Running 50 greedy requests through an engine while a fault is injected: shared by the fault tests
(tests/integration/test_fault_recovery.py, test_engine_recovery.py)."""

from __future__ import annotations

import asyncio
import random
import time

from cluster.engine import Engine
from cluster.engine_config import EngineConfig
from cluster.recovery_event import RecoveryEvent
from workers.model.sampling_params import SamplingParams

NUM_REQUESTS = 50
MAX_TOKENS = 24
FAULT_AFTER_TOKENS = NUM_REQUESTS * 6  # every request is mid-stream by then
RUN_DEADLINE_S = 240.0  # no run may hang: the whole batch of requests ends within this
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
# Requests that outlast any fault's way to the engine: with these, a test that needs every
# request still running when the fault lands cannot pass or fail by timing (10 of them fill
# 250 of ENGINE_CFG's 256 blocks: prompts are at most 40 tokens).
LONG = SamplingParams(max_tokens=360, temperature=0.0, ignore_eos=True)
ENGINE_CFG = EngineConfig(max_num_seqs=64, max_num_batched_tokens=512, block_size=16, num_kv_blocks=256)


def prompts(vocab_size: int = 2048, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randint(3, 40))] for _ in range(NUM_REQUESTS)]


def run(engine: Engine, *steps):
    """Await `steps` in order on one event loop (the engine's loop task lives on it); their results."""
    async def main():
        try:
            return [await step for step in steps]
        finally:
            await engine.shutdown()
    results = asyncio.run(main())
    return results[0] if len(steps) == 1 else results


async def grown_back(group) -> None:
    """Until the expert worker a repair dropped has been replaced (cluster/plane_actions.py)."""
    while group.background:
        await asyncio.gather(*group.background)


async def collect(engine: Engine, i: int, prompt: list[int], params: SamplingParams = GREEDY) -> dict:
    tokens, last = [], None
    async for out in engine.generate(f"r{i}", prompt, params):
        tokens += out.token_ids
        last = out
    return {"tokens": tokens, "finish_reason": last.finish_reason, "error": last.error}


async def run_requests(engine: Engine, requests: list[list[int]], fault=None,
                       fault_after: int = FAULT_AFTER_TOKENS, params: SamplingParams = GREEDY) -> dict:
    """Run every request concurrently; call `fault()` once they generated `fault_after` tokens."""
    fault_after += engine.stats().num_generated_tokens
    events: list[RecoveryEvent] = []
    engine.recovery.listeners.append(events.append)
    tasks = [asyncio.ensure_future(collect(engine, i, p, params)) for i, p in enumerate(requests)]
    injected_at = None
    if fault is not None:
        deadline = time.monotonic() + RUN_DEADLINE_S
        while engine.stats().num_generated_tokens < fault_after:
            assert time.monotonic() < deadline, "the engine never got far enough to inject the fault"
            assert not all(t.done() for t in tasks), "every request finished before the fault"
            await asyncio.sleep(0.01)
        injected_at = engine.stats().num_generated_tokens
        fault()
        resumed = asyncio.ensure_future(until_generated(engine, injected_at + len(requests), tasks))
    results = await asyncio.wait_for(asyncio.gather(*tasks), RUN_DEADLINE_S)
    engine.recovery.listeners.remove(events.append)
    return {"tokens": [r["tokens"] for r in results], "results": results, "events": events,
            "injected_at": injected_at, "resumed_after_s": await resumed if fault is not None else None}


async def until_generated(engine: Engine, num_tokens: int, tasks: list[asyncio.Future]) -> float | None:
    """Seconds until the engine generated `num_tokens` in all (reported, never asserted: a
    recovery's whole pause, re-prefill included); None when the requests ended first."""
    t0 = time.monotonic()
    while engine.stats().num_generated_tokens < num_tokens:
        if all(t.done() for t in tasks):
            return None
        await asyncio.sleep(0.01)
    return time.monotonic() - t0
