"""Drive an Engine from synchronous tests."""

from __future__ import annotations

import asyncio

from cluster.engine import Engine
from workers.model.sampling_params import SamplingParams


async def collect(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams,
                  start_after_step: int = 0):
    """Wait until the engine has run `start_after_step` steps, then run one request to the end."""
    while engine.stats().num_steps < start_after_step:
        await asyncio.sleep(0.001)
    token_ids, text, logprobs, last = [], "", [], None
    async for out in engine.generate(request_id, prompt, params):
        token_ids += out.token_ids
        text += out.text
        logprobs += out.logprobs
        last = out
    return {"token_ids": token_ids, "text": text, "logprobs": logprobs, "finish_reason": last.finish_reason}


def run_requests(engine: Engine, requests: list[tuple[list[int], SamplingParams, int]]) -> list[dict]:
    """Run (prompt, params, start_after_step) requests concurrently; results in order."""
    async def main():
        tasks = [collect(engine, f"r{i}", p, sp, start) for i, (p, sp, start) in enumerate(requests)]
        results = await asyncio.gather(*tasks)
        await engine.shutdown()
        return results
    return asyncio.run(main())
