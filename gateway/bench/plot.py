"""PNG plots of a run (latency percentiles, throughput over time) or of a sweep (against rate).

Every figure's title says what was measured: transport, model, prompt and output lengths, and
the load (rate, concurrency), so a PNG found later still reads on its own. Throughput axes start
at 0 (a bench plot compares levels, and an axis cut above 0 turns a small dip into a cliff); the
last second of a run is usually partial and is drawn over its real width, not as a full second
with a fraction of the tokens (which looked like a collapse at the end of every run). Bars carry
their values.

`run_figure` and `sweep_figure` return the matplotlib Figure (tests read its axes back);
`plot_run` and `plot_sweep` save it. matplotlib's Agg backend is set before pyplot is imported:
no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from gateway.bench.config import BenchConfig
from gateway.bench.metrics import output_throughput_timeline
from gateway.bench.report import TITLES
from gateway.bench.runner import RunResult

TRANSPORTS = {"http": "HTTP", "grpc": "gRPC"}
MIN_LAST_BIN_S = 0.25  # a last bin narrower than this holds too few tokens to be a rate: not drawn


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def describe(results: Sequence[RunResult], config: BenchConfig | None) -> str:
    """"HTTP · model demo · 128 in / 64 out tokens · concurrency 16": what the runs measured.

    Lengths are the served ones (usage), averaged over completed requests, so file prompts read
    as right as random ones."""
    first = results[0]
    parts = []
    if config is not None:
        parts.append(TRANSPORTS.get(config.target.backend, config.target.backend))
    model = first.model or (config.target.model if config is not None else None)
    if model:
        parts.append(f"model {model}")
    completed = sum(r.summary.completed for r in results)
    if completed:
        mean_in = sum(r.summary.total_input_tokens for r in results) / completed
        mean_out = sum(r.summary.total_output_tokens for r in results) / completed
        parts.append(f"{mean_in:.0f} in / {mean_out:.0f} out tokens")
    if first.max_concurrency is not None:
        parts.append(f"concurrency {first.max_concurrency}")
    return " · ".join(parts)


def throughput_steps(timeline: Sequence[float], duration_s: float) -> tuple[list[float], list[float]]:
    """(edges, rates) of output tokens/s per second, the last bin over its real width.

    `timeline[b]` counts the tokens of second b as if the bin were a full second; the run ended
    at `duration_s`, so the last bin is only `duration_s - b` wide: its tokens are divided by that
    width (or the bin is left out when it is too narrow to be a rate).
    """
    if not timeline:
        return [], []
    rates = list(timeline)
    edges = [float(b) for b in range(len(rates) + 1)]
    last = len(rates) - 1
    width = duration_s - last
    if 0 < width < 1:
        if width < MIN_LAST_BIN_S:
            rates.pop()
            edges.pop()
        else:
            rates[-1] = timeline[-1] / width
            edges[-1] = duration_s
    return edges, rates


def run_figure(result: RunResult, config: BenchConfig | None = None):
    """Left: each latency metric's mean and percentiles (ms). Right: output tokens/s each second."""
    plt = _pyplot()
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(13, 4.8))
    metrics = [m for m, _ in result.summary.latency]
    labels = ["mean"] + [f"p{q:g}" for q, _ in result.summary.latency[0][1].percentiles] if metrics else []
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        values = []
        for metric in metrics:
            stats = result.summary.stats(metric)
            values.append(stats.mean if label == "mean" else dict(stats.percentiles)[float(label[1:])])
        bars = lat.bar([m + i * width for m in range(len(metrics))], values, width, label=label)
        lat.bar_label(bars, labels=[_ms(v) for v in values], fontsize=7, rotation=90, padding=2)
    lat.set_xticks([m + width * (len(labels) - 1) / 2 for m in range(len(metrics))],
                   [TITLES[m][1] for m in metrics])
    lat.set_ylabel("ms")
    lat.set_yscale("log")  # TTFT and ITL are tens of ms, E2EL seconds: one linear axis hides the former
    lat.margins(y=0.25)  # room for the value labels above the tallest bars
    lat.set_title("Latency")
    lat.legend()
    edges, rates = throughput_steps(output_throughput_timeline(result.records), result.duration_s)
    if rates:
        thr.stairs(rates, edges, label="output tokens/s")
    thr.axhline(result.summary.output_throughput, linestyle="--", color="grey",
                label=f"mean {result.summary.output_throughput:.1f} tok/s")
    thr.set_xlim(0, max(result.duration_s, 1e-9))
    thr.set_ylim(bottom=0)
    thr.set_xlabel("seconds since the start")
    thr.set_ylabel("output tokens/s")
    thr.set_title("Output throughput over time")
    thr.legend(loc="lower right")
    fig.suptitle(f"moe-serve bench: {result.summary.completed} requests, {_load(result)}\n"
                 f"{describe([result], config)}")
    fig.tight_layout()
    return fig


def sweep_figure(results: Sequence[RunResult], config: BenchConfig | None = None):
    """Left: request and output-token throughput against the offered rate. Right: TTFT and E2EL
    median and highest percentile against it."""
    plt = _pyplot()
    fig, (thr, lat) = plt.subplots(1, 2, figsize=(13, 4.8))
    rates = [r.request_rate for r in results]
    thr.plot(rates, [r.summary.request_throughput for r in results], "o-", label="requests/s")
    thr.set_xlabel("offered request rate (req/s)")
    thr.set_ylabel("completed requests/s")
    tok = thr.twinx()
    tok.plot(rates, [r.summary.output_throughput for r in results], "s--", color="tab:orange",
             label="output tokens/s")
    tok.set_ylabel("output tokens/s")
    for axis in (thr, tok):
        axis.set_ylim(bottom=0)
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
    fig.suptitle(f"moe-serve bench: request-rate sweep, {len(results)} rates\n{describe(results, config)}")
    fig.tight_layout()
    return fig


def plot_run(result: RunResult, path: str | Path, config: BenchConfig | None = None) -> Path:
    return _save(run_figure(result, config), path)


def plot_sweep(results: Sequence[RunResult], path: str | Path, config: BenchConfig | None = None) -> Path:
    return _save(sweep_figure(results, config), path)


def _ms(value: float) -> str:
    if not math.isfinite(value):
        return ""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _load(result: RunResult) -> str:
    rate = "all at once" if result.request_rate == float("inf") else f"{result.request_rate:g} req/s"
    return rate


def _save(fig, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out
