"""Per-request records → the run's summary: throughput, latency statistics, goodput.

Definitions follow `vllm bench serve`, so numbers compare: TTFT is send → first token, TPOT the
mean time per output token after the first, ITL every gap between streamed messages (pooled over
requests), E2EL send → last byte. Tokens and latencies count successful requests only; duration
is from the first send to the last answer. Goodput is successful requests per second that met
every SLO given. Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.bench.request_record import RequestRecord

MS = 1000.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) by linear interpolation; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencyStats:
    """One metric over a run, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: tuple[tuple[float, float], ...]  # (q, value)

    @classmethod
    def of(cls, values_s: Iterable[float], qs: Sequence[float]) -> LatencyStats:
        ms = [v * MS for v in values_s]
        if not ms:
            return cls(math.nan, math.nan, math.nan, tuple((q, math.nan) for q in qs))
        return cls(statistics.fmean(ms), percentile(ms, 50), statistics.pstdev(ms),
                   tuple((q, percentile(ms, q)) for q in qs))


@dataclass(frozen=True)
class BenchSummary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed / s
    request_goodput: float | None  # good / s; None without SLOs
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    max_concurrent_requests: int  # most requests ever in flight at once
    latency: tuple[tuple[str, LatencyStats], ...]  # (metric, stats) in report order

    def stats(self, metric: str) -> LatencyStats:
        return dict(self.latency)[metric]

    def to_json(self) -> dict:
        """Flat keys like vLLM's result file: mean_ttft_ms, median_ttft_ms, p99_ttft_ms, ..."""
        out = {k: v for k, v in self.__dict__.items() if k != "latency"}
        for metric, stats in self.latency:
            out[f"mean_{metric}_ms"] = stats.mean
            out[f"median_{metric}_ms"] = stats.median
            out[f"std_{metric}_ms"] = stats.std
            for q, value in stats.percentiles:
                out[f"p{q:g}_{metric}_ms"] = value
        return out


def metric_values(records: Iterable[RequestRecord], metric: str) -> list[float]:
    """Seconds; only successful requests, and only where the metric is defined."""
    ok = [r for r in records if r.ok]
    if metric == "itl":
        return [gap for r in ok for gap in r.itl_s]
    values = {"ttft": lambda r: r.ttft_s, "tpot": lambda r: r.tpot_s, "e2el": lambda r: r.latency_s}[metric]
    return [v for v in map(values, ok) if v is not None]


def meets_slos(record: RequestRecord, slos_ms: Sequence[tuple[str, float]]) -> bool:
    """A successful request within every (metric, ms) limit; ITL counts its worst gap. A metric a
    request lacks (TPOT of a one-token answer) is no violation."""
    if not record.ok:
        return False
    for metric, limit_ms in slos_ms:
        if metric == "itl":
            value = max(record.itl_s, default=None)
        else:
            value = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2el": record.latency_s}[metric]
        if value is not None and value * MS > limit_ms:
            return False
    return True


def max_concurrency(records: Iterable[RequestRecord]) -> int:
    """The most requests in flight at any instant (an end before a start at the same time)."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def summarize(records: Sequence[RequestRecord], duration_s: float, *,
              percentiles: Sequence[float] = (50.0, 90.0, 99.0),
              metrics: Sequence[str] = ("ttft", "tpot", "itl", "e2el"),
              goodput_slos_ms: Sequence[tuple[str, float]] = ()) -> BenchSummary:
    ok = [r for r in records if r.ok]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else math.nan
    good = sum(meets_slos(r, goodput_slos_ms) for r in ok) if goodput_slos_ms else None
    return BenchSummary(
        completed=len(ok), failed=len(records) - len(ok), duration_s=duration_s,
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=len(ok) * per_s,
        request_goodput=None if good is None else good * per_s,
        output_throughput=total_out * per_s, total_token_throughput=(total_in + total_out) * per_s,
        max_concurrent_requests=max_concurrency(records),
        latency=tuple((m, LatencyStats.of(metric_values(records, m), percentiles)) for m in metrics),
    )


def output_throughput_timeline(records: Iterable[RequestRecord], bin_s: float = 1.0) -> list[float]:
    """Output tokens/s in consecutive bins from the start of the run. A message's tokens are
    counted when it arrived; a request's tokens are spread evenly over its messages (an SSE
    chunk does not say how many tokens it carried)."""
    counts: dict[int, float] = {}
    for r in records:
        if not r.ok or not r.chunk_times_s:
            continue
        share = r.output_tokens / len(r.chunk_times_s)
        for t in r.chunk_times_s:
            b = int((r.start_s + t) // bin_s)
            counts[b] = counts.get(b, 0.0) + share
    if not counts:
        return []
    return [counts.get(b, 0.0) / bin_s for b in range(max(counts) + 1)]
