"""Runs the load: warm-up, then requests at their arrival times under the concurrency bound.

One asyncio loop drives every request; a request is sent at its arrival offset, or later when
`max_concurrency` requests are already in flight (as `vllm bench serve` does). The run stops
sending at `num_prompts` or `max_duration_s`, whichever comes first, and waits for the requests
in flight (each bounded by the client's request timeout). Warm-up requests go first, all at
once within the concurrency bound, and are kept apart: their tokens still reach the server's
counters, so the result file reports them separately.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from tqdm import tqdm

from gateway.bench.arrivals import arrival_offsets
from gateway.bench.config import BenchConfig, LoadConfig, TargetConfig
from gateway.bench.dataset import BenchRequest, load_requests
from gateway.bench.metrics import BenchSummary, summarize
from gateway.bench.request_record import RequestRecord, failed

CONNECT_TIMEOUT_S = 30.0


class Client(Protocol):
    async def start(self) -> None: ...
    async def send(self, request: BenchRequest, start_s: float) -> RequestRecord: ...
    async def close(self) -> None: ...


def make_client(target: TargetConfig, max_connections: int | None = None) -> Client:
    """The client for `target.backend`; imported only when chosen (gRPC stubs are generated on import)."""
    if target.backend == "grpc":
        from gateway.bench.grpc_client import GrpcClient

        return GrpcClient(target, max_connections)
    from gateway.bench.http_client import HttpClient

    return HttpClient(target, max_connections)


@dataclass(frozen=True)
class RunResult:
    request_rate: float
    max_concurrency: int | None
    duration_s: float
    records: tuple[RequestRecord, ...]
    warmup_records: tuple[RequestRecord, ...]
    summary: BenchSummary
    model: str | None = None  # the model the requests named (learnt from the server if not given)


async def send_all(client: Client, requests: Sequence[BenchRequest], offsets: Sequence[float],
                   max_concurrency: int | None, max_duration_s: float | None = None,
                   progress: bool = False) -> tuple[list[RequestRecord], float]:
    """Sends `requests[i]` at `offsets[i]` seconds from now; returns the records (in send order)
    and the duration from the start to the last answer."""
    t0 = time.perf_counter()
    deadline = t0 + (max_duration_s if max_duration_s is not None else math.inf)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), disable=not progress, unit="req", dynamic_ncols=True)

    async def one(request: BenchRequest, start_s: float) -> RequestRecord:
        try:
            return await client.send(request, start_s)
        except Exception as exc:  # a client bug must not take the other requests down with it
            return failed(start_s, time.perf_counter() - t0 - start_s, f"{type(exc).__name__}: {exc}")
        finally:
            if slots is not None:
                slots.release()
            bar.update(1)

    tasks: list[asyncio.Task[RequestRecord]] = []
    try:
        for request, offset in zip(requests, offsets, strict=True):
            if t0 + offset >= deadline:
                break
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            if slots is not None:
                left = deadline - time.perf_counter()
                try:
                    await asyncio.wait_for(slots.acquire(), None if math.isinf(left) else max(left, 0.0))
                except TimeoutError:
                    break
            tasks.append(asyncio.create_task(one(request, time.perf_counter() - t0)))
        records = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    return list(records), time.perf_counter() - t0


async def run_one(client: Client, requests: Sequence[BenchRequest], load: LoadConfig, config: BenchConfig,
                  progress: bool) -> RunResult:
    warmups: list[RequestRecord] = []
    if load.num_warmups:
        warm = [requests[i % len(requests)] for i in range(load.num_warmups)]
        warmups, _ = await send_all(client, warm, [0.0] * len(warm), load.max_concurrency)
    offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness, load.seed)
    records, duration = await send_all(client, requests, offsets, load.max_concurrency, load.max_duration_s,
                                       progress)
    report = config.report
    summary = summarize(records, duration, percentiles=report.percentiles, metrics=report.percentile_metrics,
                        goodput_slos_ms=report.goodput_slos_ms)
    return RunResult(load.request_rate, load.max_concurrency, duration, tuple(records), tuple(warmups),
                     summary, model=getattr(client, "model", None))


async def run_benchmark(config: BenchConfig) -> list[RunResult]:
    """One run, or one per sweep rate (same prompts, same seed), against one client."""
    requests = load_requests(config.dataset)
    loads = ([replace(config.load, request_rate=rate) for rate in config.sweep_rates]
             or [config.load])
    client = make_client(config.target, config.load.max_concurrency)
    try:
        await asyncio.wait_for(client.start(), CONNECT_TIMEOUT_S)
        return [await run_one(client, requests, load, config, config.report.progress) for load in loads]
    finally:
        await client.close()


def run(config: BenchConfig) -> list[RunResult]:
    return asyncio.run(run_benchmark(config))
