"""PNG plots of a run (latency percentiles, throughput over time) or of a sweep (against rate).

matplotlib's Agg backend, set before pyplot is imported: no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gateway.bench.metrics import output_throughput_timeline
from gateway.bench.report import TITLES
from gateway.bench.runner import RunResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(result: RunResult, path: str | Path) -> Path:
    """Left: each latency metric's mean and percentiles (ms). Right: output tokens/s each second."""
    plt = _pyplot()
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(12, 4.5))
    metrics = [m for m, _ in result.summary.latency]
    labels = ["mean"] + [f"p{q:g}" for q, _ in result.summary.latency[0][1].percentiles] if metrics else []
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        values = []
        for metric in metrics:
            stats = result.summary.stats(metric)
            values.append(stats.mean if label == "mean" else dict(stats.percentiles)[float(label[1:])])
        lat.bar([m + i * width for m in range(len(metrics))], values, width, label=label)
    lat.set_xticks([m + width * (len(labels) - 1) / 2 for m in range(len(metrics))],
                   [TITLES[m][1] for m in metrics])
    lat.set_ylabel("ms")
    lat.set_yscale("log")  # TTFT and ITL are tens of ms, E2EL seconds: one linear axis hides the former
    lat.set_title("Latency")
    lat.legend()
    timeline = output_throughput_timeline(result.records)
    thr.plot(range(len(timeline)), timeline, drawstyle="steps-post")
    thr.axhline(result.summary.output_throughput, linestyle="--", color="grey",
                label=f"mean {result.summary.output_throughput:.1f} tok/s")
    thr.set_xlabel("seconds since the start")
    thr.set_ylabel("output tokens/s")
    thr.set_title("Output throughput over time")
    thr.legend()
    fig.suptitle(f"moe-serve bench: {result.summary.completed} requests, {_load(result)}")
    return _save(fig, plt, path)


def plot_sweep(results: Sequence[RunResult], path: str | Path) -> Path:
    """Left: request and output-token throughput against the offered rate. Right: TTFT and E2EL
    median and highest percentile against it."""
    plt = _pyplot()
    fig, (thr, lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    rates = [r.request_rate for r in results]
    thr.plot(rates, [r.summary.request_throughput for r in results], "o-", label="requests/s")
    thr.set_xlabel("offered request rate (req/s)")
    thr.set_ylabel("completed requests/s")
    tok = thr.twinx()
    tok.plot(rates, [r.summary.output_throughput for r in results], "s--", color="tab:orange",
             label="output tokens/s")
    tok.set_ylabel("output tokens/s")
    thr.legend(loc="upper left")
    tok.legend(loc="lower right")
    thr.set_title("Throughput against request rate")
    for metric in ("ttft", "e2el"):
        if metric not in dict(results[0].summary.latency):
            continue
        q_top = results[0].summary.stats(metric).percentiles[-1][0]
        lat.plot(rates, [r.summary.stats(metric).median for r in results], "o-",
                 label=f"median {TITLES[metric][1]}")
        lat.plot(rates, [dict(r.summary.stats(metric).percentiles)[q_top] for r in results], "o--",
                 label=f"p{q_top:g} {TITLES[metric][1]}")
    lat.set_xlabel("offered request rate (req/s)")
    lat.set_ylabel("ms")
    lat.set_yscale("log")
    lat.set_title("Latency against request rate")
    lat.legend()
    fig.suptitle("moe-serve bench: request-rate sweep")
    return _save(fig, plt, path)


def _load(result: RunResult) -> str:
    rate = "all at once" if result.request_rate == float("inf") else f"{result.request_rate:g} req/s"
    return rate if result.max_concurrency is None else f"{rate}, at most {result.max_concurrency} in flight"


def _save(fig, plt, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
