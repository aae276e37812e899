"""`moe-serve bench --plot`, read back from the matplotlib figures: titles say what was measured,
throughput axes start at 0, the last partial second is not drawn as a collapse, bars carry values."""

from __future__ import annotations

import pytest

from gateway.bench.config import BenchConfig, DatasetConfig, LoadConfig, TargetConfig
from gateway.bench.metrics import summarize
from gateway.bench.plot import MIN_LAST_BIN_S, run_figure, sweep_figure, throughput_steps
from gateway.bench.request_record import RequestRecord
from gateway.bench.runner import RunResult

pytest.importorskip("matplotlib")

TOKENS_PER_S = 100.0


def steady_result(duration_s: float = 4.5, rate: float = float("inf"), concurrency: int | None = 16,
                  model: str | None = "demo") -> RunResult:
    """Requests streaming a steady 100 tokens/s in all from 0 to `duration_s` (one token per chunk),
    so a correct timeline is flat at 100 up to the end, the last half second included."""
    records = []
    num_tokens = int(duration_s * TOKENS_PER_S)
    per_request = 50
    for start in range(0, num_tokens, per_request):
        times = tuple((start + k + 1) / TOKENS_PER_S - start / TOKENS_PER_S for k in range(per_request))
        records.append(RequestRecord(ok=True, start_s=start / TOKENS_PER_S, latency_s=times[-1],
                                     chunk_times_s=times, prompt_tokens=128, output_tokens=per_request))
    duration = max(r.end_s for r in records)
    return RunResult(rate, concurrency, duration, tuple(records), (), summarize(records, duration),
                     model=model)


def config(backend: str = "http") -> BenchConfig:
    return BenchConfig(target=TargetConfig(backend=backend),
                       dataset=DatasetConfig(input_len=128, output_len=50),
                       load=LoadConfig(max_concurrency=16))


def test_run_title_axis_from_zero_and_last_partial_second():
    result = steady_result()
    fig = run_figure(result, config("grpc"))
    title = fig._suptitle.get_text()
    for part in ("gRPC", "model demo", "128 in / 50 out tokens", "concurrency 16", "all at once"):
        assert part in title, title
    lat, thr = fig.axes
    assert thr.get_ylim()[0] == 0
    (steps,) = thr.patches  # the stairs of tokens/s
    values = steps.get_data().values
    edges = steps.get_data().edges
    assert edges[-1] == pytest.approx(result.duration_s)  # drawn up to the end, not to a whole second
    # Flat at the true rate up to the end: the last (half) second is not a drop to half the rate.
    assert values[-1] == pytest.approx(TOKENS_PER_S, rel=0.05), values
    assert min(values) >= 0.9 * TOKENS_PER_S, values


def test_bars_carry_their_values():
    result = steady_result()
    fig = run_figure(result, config())
    lat = fig.axes[0]
    bars = lat.containers
    assert bars and all(len(c) == len(result.summary.latency) for c in bars)
    labels = [t.get_text() for t in lat.texts]
    assert len(labels) == sum(len(c) for c in bars) and all(labels)
    ttft_mean = result.summary.stats("ttft").mean  # 10 ms here
    assert f"{ttft_mean:.0f}" in labels, (ttft_mean, labels)


def test_sweep_title_and_axes_from_zero():
    results = [steady_result(rate=r, concurrency=None) for r in (1.0, 2.0, 4.0)]
    fig = sweep_figure(results, config())
    title = fig._suptitle.get_text()
    for part in ("HTTP", "model demo", "128 in / 50 out tokens", "3 rates"):
        assert part in title, title
    thr, lat, tok = fig.axes  # the token axis is the twin of the request axis
    assert thr.get_ylim()[0] == 0 and tok.get_ylim()[0] == 0


def test_model_unknown_and_no_config():
    fig = run_figure(steady_result(model=None))
    title = fig._suptitle.get_text()
    assert "model" not in title.split("\n")[1] and "128 in / 50 out tokens" in title


@pytest.mark.parametrize(("timeline", "duration", "edges", "rates"), [
    ([100.0, 100.0, 50.0], 2.5, [0, 1, 2, 2.5], [100, 100, 100]),  # the half second: 50 tokens in 0.5 s
    ([100.0, 100.0, 10.0], 2.1, [0, 1, 2], [100, 100]),  # 0.1 s: too narrow to be a rate
    ([100.0, 100.0], 2.0, [0, 1, 2], [100, 100]),  # whole seconds: as they are
    ([], 0.0, [], []),
])
def test_throughput_steps(timeline, duration, edges, rates):
    assert MIN_LAST_BIN_S > 0.1
    got_edges, got_rates = throughput_steps(timeline, duration)
    assert got_edges == pytest.approx(edges) and got_rates == pytest.approx(rates)
