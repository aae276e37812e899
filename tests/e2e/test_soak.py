"""Soak (issue 8): five minutes at about half the measured capacity, through `gateway.bench` as a library.

Against the e2e app with an expert-parallel group (1 attention + 2 expert workers): first the
capacity is measured at a fixed concurrency (which also warms the server up), then Poisson load
at half that rate runs for five minutes. It must end with zero failed requests, and every
process of the group (the Serve replicas and the group's Ray workers) must have grown by less
than 5 % or 50 MB of resident memory, whichever is larger, between the end of the warm-up and
the end of the soak. Marked slow: `make test-slow` runs it.
"""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from gateway.bench.config import BenchConfig, DatasetConfig, LoadConfig, ReportConfig, TargetConfig
from gateway.bench.report import format_report
from gateway.bench.runner import RunResult, run_benchmark

pytestmark = pytest.mark.slow

SOAK_S = 300.0
CAPACITY_CONCURRENCY = 8
BURST = 32  # the e2e app's max_num_seqs: the warm-up reaches the largest batch the soak can make
RSS_EVERY_S = 30.0
INPUT_LEN, OUTPUT_LEN = 64, 32
MB = 1024 * 1024
# Process titles Ray gives the processes of our app and its model group.
GROUP_TITLES = ("ray::ServeReplica:e2e:", "ray::AttentionWorker", "ray::ExpertWorker")


def bench(server, *, num_prompts: int, load: LoadConfig, seed: int) -> RunResult:
    config = BenchConfig(
        target=TargetConfig(base_url=server.url, model=server.model_name, request_timeout_s=120.0),
        dataset=DatasetConfig(num_prompts=num_prompts, input_len=INPUT_LEN, output_len=OUTPUT_LEN,
                              range_ratio=0.25, vocab_size=2048, seed=seed),
        load=load, report=ReportConfig(progress=False),
    )
    [result] = asyncio.run(run_benchmark(config))
    return result


def group_processes() -> dict[int, str]:
    """pid → title of this cluster's app and group processes (children of our own raylet only:
    other Ray clusters may run on the same machine)."""
    import psutil  # ships with Ray (importable once ray is imported)
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    out = {}
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            title = proc.cmdline()[0]
        except (psutil.Error, IndexError):
            continue
        if title.startswith(GROUP_TITLES):
            out[proc.pid] = title
    return out


def rss(pids) -> dict[int, int]:
    import psutil

    return {pid: psutil.Process(pid).memory_info().rss for pid in pids}


class RssSampler(threading.Thread):
    """RSS of `pids` every RSS_EVERY_S while the soak runs: a leak climbs steadily, a warm-up
    effect (allocator pools, a larger batch than before) steps once and stays flat."""

    def __init__(self, pids) -> None:
        super().__init__(daemon=True)
        self.pids, self.samples, self.stop = list(pids), [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(RSS_EVERY_S):
            self.samples.append(rss(self.pids))


def test_soak_at_half_capacity_has_no_errors_and_flat_memory(openai_server):
    # Warm-up: a burst as large as the engine runs at once, then the capacity at a fixed concurrency
    # (its first requests are warm-ups too).
    warmup = bench(openai_server, num_prompts=BURST, seed=0, load=LoadConfig())
    assert warmup.summary.failed == 0, {r.error for r in warmup.records if not r.ok}
    load = LoadConfig(max_concurrency=CAPACITY_CONCURRENCY, num_warmups=2 * CAPACITY_CONCURRENCY)
    capacity = bench(openai_server, num_prompts=48, seed=1, load=load)
    print("\n" + format_report(capacity.summary, title="capacity", records=capacity.records))
    assert capacity.summary.failed == 0 and capacity.summary.completed == 48
    rate = capacity.summary.request_throughput / 2

    processes = group_processes()
    # "ray::ServeReplica:e2e:Ingress", "ray::AttentionWorker.execute", ... → Ingress, AttentionWorker
    kinds = {title.rsplit(":", 1)[-1].split(".")[0] for title in processes.values()}
    assert kinds == {"Ingress", "EngineDeployment", "AttentionWorker", "ExpertWorker"}, processes
    before = rss(processes)

    sampler = RssSampler(processes)
    sampler.start()
    try:
        soak = bench(openai_server, num_prompts=math.ceil(rate * SOAK_S * 2) + 10, seed=2,
                     load=LoadConfig(request_rate=rate, max_duration_s=SOAK_S))
    finally:
        sampler.stop.set()
        sampler.join()
    print(format_report(soak.summary, title=f"soak at {rate:.2f} req/s", records=soak.records))

    assert soak.summary.failed == 0, {r.error for r in soak.records if not r.ok}
    assert soak.summary.completed >= rate * SOAK_S * 0.5  # the load really ran for the whole time
    assert group_processes() == processes  # no process died or was replaced
    after = rss(processes)
    for pid, title in processes.items():
        growth, limit = after[pid] - before[pid], max(0.05 * before[pid], 50 * MB)
        trajectory = " ".join(f"{s[pid] / MB:.0f}" for s in sampler.samples)
        print(f"{title:<40} rss {before[pid] / MB:7.1f} → {after[pid] / MB:7.1f} MB ({growth / MB:+5.1f}); "
              f"every {RSS_EVERY_S:g} s: {trajectory}")
        assert growth < limit, f"{title} (pid {pid}) grew {growth / MB:.1f} MB, limit {limit / MB:.1f} MB"
