"""The summary as a text table, laid out like `vllm bench serve`'s."""

from __future__ import annotations

from collections import Counter

from gateway.bench.metrics import BenchSummary
from gateway.bench.request_record import RequestRecord

WIDTH = 50
TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def _row(label: str, value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40}{value}"


def format_report(summary: BenchSummary, *, title: str = "Serving Benchmark Result",
                  records: tuple[RequestRecord, ...] = ()) -> str:
    lines = [f" {title} ".center(WIDTH, "=")]
    lines += [
        _row("Successful requests:", summary.completed),
        _row("Failed requests:", summary.failed),
        _row("Maximum request concurrency:", summary.max_concurrent_requests),
        _row("Benchmark duration (s):", summary.duration_s),
        _row("Total input tokens:", summary.total_input_tokens),
        _row("Total generated tokens:", summary.total_output_tokens),
        _row("Request throughput (req/s):", summary.request_throughput),
    ]
    if summary.request_goodput is not None:
        lines.append(_row("Request goodput (req/s):", summary.request_goodput))
    lines += [
        _row("Output token throughput (tok/s):", summary.output_throughput),
        _row("Total token throughput (tok/s):", summary.total_token_throughput),
    ]
    for metric, stats in summary.latency:
        heading, short = TITLES[metric]
        lines.append(f"{heading}".center(WIDTH, "-"))
        lines.append(_row(f"Mean {short} (ms):", stats.mean))
        lines.append(_row(f"Median {short} (ms):", stats.median))
        for q, value in stats.percentiles:
            if q == 50:
                continue  # the median, just above
            lines.append(_row(f"P{q:g} {short} (ms):", value))
    errors = Counter(r.error for r in records if not r.ok)
    if errors:
        lines.append("Errors".center(WIDTH, "-"))
        lines += [f"{count:>5} × {message}" for message, count in errors.most_common(5)]
    lines.append("=" * WIDTH)
    return "\n".join(lines)
