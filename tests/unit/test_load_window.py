"""The sliding window of expert load and busy time: sums, forgetting, and the busy fraction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.load_window import LoadWindow


def test_sums_tokens_and_busy_time_over_the_window():
    w = LoadWindow(window_s=30.0)
    w.add(2.0, {(0, 1): 10, (1, 3): 5}, {0: 1.0, 1: 0.5}, wall_seconds=2.0)
    w.add(4.0, {(0, 1): 6, (0, 2): 4}, {0: 2.0, 1: 0.5}, wall_seconds=2.0)
    assert w.load() == {(0, 1): 16.0, (1, 3): 5.0, (0, 2): 4.0}
    assert w.total_tokens() == 25
    assert w.span_s() == 4.0
    # Worker 0 busy 3 s of 4, worker 1 busy 1 s of 4: mean (0.75 + 0.25) / 2.
    assert w.busy_fraction() == 0.5
    assert len(w) == 2


def test_forgets_observations_older_than_the_window():
    w = LoadWindow(window_s=10.0)
    w.add(0.0, {(0, 0): 100}, {0: 1.0}, 1.0)
    w.add(5.0, {(0, 1): 7}, {0: 1.0}, 5.0)
    w.add(10.0, {(0, 1): 3}, {0: 5.0}, 5.0)
    assert w.load() == {(0, 0): 100.0, (0, 1): 10.0}  # the one at exactly now - window_s stays
    w.add(12.0, {}, {0: 0.0}, 2.0)
    assert w.load() == {(0, 1): 10.0}
    assert w.total_tokens() == 10
    assert w.span_s() == 12.0
    assert w.busy_fraction() == pytest.approx(6.0 / 12.0)


def test_missing_worker_counts_as_idle_and_a_share_is_capped_at_one():
    w = LoadWindow(window_s=60.0)
    w.add(1.0, {}, {0: 1.5}, 1.0)  # measured busy time overran the wall clock
    w.add(2.0, {}, {1: 0.5}, 1.0)
    # Worker 0: min(1, 1.5 / 2) = 0.75; worker 1: 0.5 / 2 = 0.25.
    assert w.busy_fraction() == 0.5
    w.add(3.0, {}, {0: 9.0}, 1.0)
    assert w.busy_fraction() == pytest.approx((1.0 + 0.5 / 3) / 2)


def test_no_data_gives_no_busy_fraction_and_clear_restarts():
    w = LoadWindow(window_s=5.0)
    assert w.busy_fraction() is None and w.load() == {} and w.total_tokens() == 0 and w.span_s() == 0
    w.add(1.0, {(0, 0): 3}, {}, 1.0)
    assert w.busy_fraction() is None  # no worker reported
    w.add(2.0, {}, {0: 0.0}, 0.0)
    assert w.busy_fraction() == 0.0
    w.clear()
    assert len(w) == 0 and w.load() == {} and w.busy_fraction() is None
    w.add(1.5, {(0, 0): 1}, {0: 1.0}, 1.0)  # after a clear, time may start anywhere
    assert w.busy_fraction() == 1.0


@pytest.mark.parametrize(("args", "match"), [
    ((0.5, {}, {}, 1.0), "go back"),
    ((3.0, {}, {}, -1.0), "wall_seconds"),
    ((3.0, {(0, 0): -1}, {}, 1.0), "tokens"),
    ((3.0, {}, {0: float("nan")}, 1.0), "busy_seconds"),
])
def test_bad_observations_are_refused(args, match):
    w = LoadWindow(window_s=5.0)
    w.add(1.0, {}, {}, 1.0)
    with pytest.raises(ValueError, match=match):
        w.add(*args)
    with pytest.raises(ValueError, match="window_s"):
        LoadWindow(window_s=0.0)


observation = st.tuples(
    st.floats(0.0, 8.0),  # time since the previous observation
    st.dictionaries(st.tuples(st.integers(0, 2), st.integers(0, 3)), st.integers(0, 50), max_size=5),
    st.dictionaries(st.integers(0, 3), st.floats(0.0, 10.0), max_size=4),
    st.floats(0.0, 8.0),  # wall seconds
)


@settings(max_examples=150, deadline=None)
@given(window_s=st.floats(1.0, 30.0), observations=st.lists(observation, min_size=1, max_size=20))
def test_window_matches_a_recount_of_the_recent_observations(window_s, observations):
    w = LoadWindow(window_s)
    now = 0.0
    seen = []
    for gap, tokens, busy, wall in observations:
        now += gap
        w.add(now, tokens, busy, wall)
        seen.append((now, tokens, busy, wall))
        recent = [obs for obs in seen if obs[0] >= now - window_s]
        expected: dict[tuple[int, int], float] = {}
        for _, toks, _, _ in recent:
            for key, n in toks.items():
                expected[key] = expected.get(key, 0.0) + n
        assert w.load() == expected
        assert w.total_tokens() == sum(expected.values())
        assert w.span_s() == pytest.approx(sum(obs[3] for obs in recent))
        fraction = w.busy_fraction()
        workers = {k for obs in recent for k in obs[2]}
        if workers and w.span_s() > 0:
            assert fraction is not None and 0.0 <= fraction <= 1.0
        else:
            assert fraction is None


def test_the_busiest_worker_is_the_mean_times_the_imbalance():
    w = LoadWindow(10.0)
    w.add(1.0, {}, {0: 0.9, 1: 0.1, 2: 0.2}, 1.0)
    assert w.busiest_fraction() == pytest.approx(0.9)
    assert w.busy_fraction() == pytest.approx(0.4)
    w.add(2.0, {}, {0: 0.1}, 1.0)  # workers 1 and 2 idle in this one
    assert w.busiest_fraction() == pytest.approx(0.5)
    assert LoadWindow(1.0).busiest_fraction() is None
