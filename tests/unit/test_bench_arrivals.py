"""Arrival times of `moe-serve bench`: Poisson and gamma statistics from a seed."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from gateway.bench.arrivals import arrival_offsets, inter_arrival_times

N = 20_000


def ks_two_sample(a: list[float], b: np.ndarray) -> float:
    """Kolmogorov–Smirnov distance between two samples' empirical CDFs."""
    a_sorted, b_sorted = np.sort(np.asarray(a)), np.sort(b)
    grid = np.concatenate([a_sorted, b_sorted])
    cdf_a = np.searchsorted(a_sorted, grid, side="right") / len(a_sorted)
    cdf_b = np.searchsorted(b_sorted, grid, side="right") / len(b_sorted)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def test_poisson_gaps_are_exponential_with_mean_one_over_rate():
    gaps = inter_arrival_times(N, request_rate=5.0, burstiness=1.0, seed=1)
    assert statistics.fmean(gaps) == pytest.approx(0.2, rel=0.03)
    # Exponential: standard deviation = mean, and P(gap > t) = exp(-rate t).
    assert statistics.pstdev(gaps) == pytest.approx(0.2, rel=0.05)
    for t in (0.1, 0.2, 0.5):
        assert sum(g > t for g in gaps) / N == pytest.approx(math.exp(-5.0 * t), abs=0.01)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 8.0])
def test_gamma_gaps_keep_the_rate_and_follow_numpys_gamma(burstiness):
    rate = 4.0
    gaps = inter_arrival_times(N, request_rate=rate, burstiness=burstiness, seed=7)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
    # Gamma(k, θ): coefficient of variation 1/sqrt(k): burstier below 1, steadier above.
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.07)
    reference = np.random.default_rng(0).gamma(burstiness, 1 / (rate * burstiness), size=N)
    # Two samples of 20k from one distribution: KS distance well under 1.36·sqrt(2/N) ≈ 0.0136.
    assert ks_two_sample(gaps, reference) < 0.0136


def test_the_same_seed_gives_the_same_arrivals_and_another_seed_others():
    a = arrival_offsets(100, 3.0, 0.5, seed=11)
    assert a == arrival_offsets(100, 3.0, 0.5, seed=11)
    assert a != arrival_offsets(100, 3.0, 0.5, seed=12)


def test_offsets_are_cumulative_and_non_decreasing():
    gaps = inter_arrival_times(50, 10.0, seed=3)
    offsets = arrival_offsets(50, 10.0, seed=3)
    assert offsets == pytest.approx(list(np.cumsum(gaps)))
    assert all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert inter_arrival_times(0, 2.0) == []


@pytest.mark.parametrize("rate, burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (math.nan, 1.0)])
def test_bad_rates_are_refused(rate, burstiness):
    with pytest.raises(ValueError):
        inter_arrival_times(3, rate, burstiness)
