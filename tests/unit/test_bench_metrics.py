"""`moe-serve bench`'s summary: percentiles against numpy, TPOT/ITL definitions, goodput."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from gateway.bench.metrics import (
    max_concurrency,
    meets_slos,
    metric_values,
    output_throughput_timeline,
    percentile,
    summarize,
)
from gateway.bench.request_record import RequestRecord, failed


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(n, q):
    values = [random.Random(n * 1000 + i).expovariate(1.0) for i in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_of_nothing_is_nan_and_bad_q_is_refused():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def rec(start, chunks, out_tokens, latency=None, prompt=10):
    return RequestRecord(ok=True, start_s=start, latency_s=latency if latency is not None else chunks[-1],
                         chunk_times_s=tuple(chunks), prompt_tokens=prompt, output_tokens=out_tokens)


def test_ttft_tpot_itl_e2el_definitions():
    r = rec(0.0, [0.1, 0.15, 0.3, 0.4], 4, latency=0.41)
    assert r.ttft_s == 0.1
    assert r.itl_s == pytest.approx([0.05, 0.15, 0.1])
    assert r.tpot_s == pytest.approx((0.41 - 0.1) / 3)  # after the first token, per token
    assert rec(0.0, [0.2], 1).tpot_s is None  # one token: no TPOT


def test_summary_counts_only_successful_requests():
    records = [rec(0.0, [0.1, 0.2], 2, prompt=5), rec(0.5, [0.2, 0.4, 0.6], 3, prompt=7),
               failed(0.7, 0.05, "HTTP 503: overloaded")]
    s = summarize(records, duration_s=2.0, percentiles=(50, 99))
    assert (s.completed, s.failed) == (2, 1)
    assert (s.total_input_tokens, s.total_output_tokens) == (12, 5)
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(2.5)
    assert s.total_token_throughput == pytest.approx(8.5)
    assert s.request_goodput is None
    assert s.stats("ttft").mean == pytest.approx(150.0)  # ms
    assert s.stats("itl").median == pytest.approx(200.0)  # gaps 100, 200, 200 ms
    assert sorted(metric_values(records, "e2el")) == pytest.approx([0.2, 0.6])
    flat = s.to_json()
    assert flat["p99_ttft_ms"] == pytest.approx(percentile([100.0, 200.0], 99))
    assert {"mean_tpot_ms", "median_itl_ms", "std_e2el_ms", "p50_e2el_ms"} <= flat.keys()


def test_goodput_counts_requests_within_every_slo():
    fast = rec(0.0, [0.05, 0.07, 0.09], 3)  # ttft 50 ms, tpot 20 ms, worst itl 20 ms
    slow_first = rec(0.0, [0.6, 0.62], 2)  # ttft 600 ms
    slow_decode = rec(0.0, [0.05, 0.25], 2)  # tpot 200 ms
    one_token = rec(0.0, [0.1], 1)  # no tpot: not a violation
    records = [fast, slow_first, slow_decode, one_token, failed(0.0, 0.1, "boom")]
    slos = (("ttft", 500.0), ("tpot", 100.0))
    assert [meets_slos(r, slos) for r in records] == [True, False, False, True, False]
    s = summarize(records, duration_s=4.0, goodput_slos_ms=slos)
    assert s.request_goodput == pytest.approx(2 / 4.0)
    assert meets_slos(fast, (("itl", 19.0),)) is False
    assert meets_slos(fast, (("e2el", 100.0),)) is True


def test_max_concurrency_counts_overlap():
    records = [rec(0.0, [1.0], 1), rec(0.5, [1.0], 1), rec(1.0, [1.0], 1), rec(3.0, [0.1], 1)]
    # [0, 1], [0.5, 1.5], [1, 2], [3, 3.1]: the first ends as the third starts.
    assert max_concurrency(records) == 2


def test_throughput_timeline_spreads_tokens_over_messages():
    records = [rec(0.0, [0.5, 1.5], 4), rec(1.0, [0.2], 1), failed(0.0, 1.0, "x")]
    assert output_throughput_timeline(records) == pytest.approx([2.0, 3.0])
    assert output_throughput_timeline([]) == []
