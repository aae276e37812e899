"""`moe-serve bench`'s outputs from synthetic records: the text report and the PNG plots."""

from __future__ import annotations

import math

from gateway.bench.metrics import summarize
from gateway.bench.plot import plot_run, plot_sweep
from gateway.bench.report import format_report
from gateway.bench.request_record import RequestRecord, failed
from gateway.bench.runner import RunResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def result(rate: float, n: int = 20) -> RunResult:
    records = [RequestRecord(ok=True, start_s=i / rate if math.isfinite(rate) else 0.0, latency_s=0.5,
                             chunk_times_s=tuple(0.1 + 0.05 * k for k in range(9)), prompt_tokens=16,
                             output_tokens=9) for i in range(n)]
    records.append(failed(0.2, 0.01, "HTTP 503: overloaded"))
    duration = max(r.end_s for r in records)
    return RunResult(rate, 4, duration, tuple(records), (),
                     summarize(records, duration, goodput_slos_ms=(("ttft", 50.0),)))


def test_report_lists_counts_latencies_and_errors():
    r = result(4.0)
    text = format_report(r.summary, records=r.records)
    lines = text.splitlines()
    assert "Successful requests:                    20" in lines
    assert "Failed requests:                        1" in lines
    assert "Total generated tokens:                 180" in lines
    assert "Request goodput (req/s):                0.00" in lines  # TTFT 100 ms > the 50 ms SLO
    assert "Median TTFT (ms):                       100.00" in lines
    assert "P99 ITL (ms):                           50.00" in lines
    assert not any(line.startswith("P50") for line in lines)  # the median is the p50
    assert "    1 × HTTP 503: overloaded" in lines
    assert all(line == line.rstrip() for line in lines)


def test_plots_are_pngs(tmp_path):
    run_png = plot_run(result(math.inf), tmp_path / "run.png")
    sweep_png = plot_sweep([result(1.0), result(2.0), result(4.0)], tmp_path / "sub" / "sweep.png")
    for path in (run_png, sweep_png):
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 10_000
