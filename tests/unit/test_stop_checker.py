"""StopChecker: stop tokens, stop strings across token boundaries, length limits."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.stop_checker import StopChecker, StopDecision
from workers.model.sampling_params import SamplingParams

EOS = 2
PLAIN = 100  # a token id that is neither EOS nor a stop token


def feed(
    checker: StopChecker, deltas: list[str], token_ids: list[int] | None = None
) -> tuple[list[str], StopDecision | None]:
    """Feed deltas until the checker finishes; the emitted texts and the final decision."""
    token_ids = token_ids or [PLAIN] * len(deltas)
    emitted: list[str] = []
    decision = None
    for n, (token_id, delta) in enumerate(zip(token_ids, deltas, strict=True), start=1):
        decision = checker.check(token_id, delta, num_output_tokens=n, num_total_tokens=10 + n)
        emitted.append(decision.text)
        if decision.finished:
            break
    return emitted, decision


def checker(max_model_len: int = 10_000, **params) -> StopChecker:
    params.setdefault("max_tokens", 1000)
    return StopChecker(SamplingParams(**params), eos_token_ids=(EOS,), max_model_len=max_model_len)


def expected_cut(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """Reference: read `text` character by character; stop at the first completed stop string."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            longest = max(done, key=len)  # on a tie of ends, the earlier start wins
            return (text[:end] if include else text[: end - len(longest)]), True
    return text, False


# --- stop strings ---------------------------------------------------------------------


def test_stop_string_spanning_tokens():
    emitted, decision = feed(checker(stop=("lo w",)), ["Hel", "lo wo", "rld"])
    assert emitted == ["He", "l"]
    assert decision == StopDecision(finished=True, reason="stop", text="l")
    assert "".join(emitted) == "Hel"


def test_stop_string_spanning_tokens_included():
    emitted, decision = feed(
        checker(stop=("lo w",), include_stop_str_in_output=True), ["Hel", "lo wo", "rld"]
    )
    assert emitted == ["Hel", "lo w"]  # nothing is held back when the stop string is shown
    assert decision.reason == "stop"


def test_earliest_stop_string_wins():
    emitted, decision = feed(checker(stop=("world", "lo")), ["hello world"])
    assert "".join(emitted) == "hel"
    emitted, decision = feed(checker(stop=("world", "lo")), ["he", "l", "l", "o world"])
    assert "".join(emitted) == "hel"
    assert decision.reason == "stop"


def test_first_completed_stop_string_wins_whatever_the_split():
    # "bc" completes before "abcd" does, so it wins whether or not "d" arrived with it.
    for deltas in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        emitted, _ = feed(checker(stop=("abcd", "bc")), deltas)
        assert "".join(emitted) == "a", deltas


def test_stop_string_at_the_very_beginning():
    emitted, decision = feed(checker(stop=("STOP",)), ["STOP and more"])
    assert emitted == [""]
    assert decision == StopDecision(finished=True, reason="stop", text="")
    emitted, _ = feed(checker(stop=("STOP",)), ["ST", "OP", "x"])
    assert emitted == ["", ""]


def test_held_back_text_is_released_when_it_stops_matching():
    emitted, decision = feed(checker(stop=("abc",)), ["xa", "b", "x", "y"])
    assert emitted == ["x", "", "abx", "y"]
    assert not decision.finished


def test_partial_match_restarts_inside_held_text():
    # "aab": the first "a" cannot start "abc" once the second "a" arrives, the second can.
    emitted, decision = feed(checker(stop=("abc",)), ["a", "a", "b", "c"])
    assert emitted == ["", "a", "", ""]
    assert decision.reason == "stop"


def test_flush_releases_held_text():
    stop_checker = checker(stop=("abc",))
    emitted, _ = feed(stop_checker, ["xyz", "ab"])
    assert emitted == ["xyz", ""]
    assert stop_checker.flush() == "ab"
    assert stop_checker.finished


def test_no_stop_strings_emits_everything_at_once():
    emitted, decision = feed(checker(), ["a", "bc", ""])
    assert emitted == ["a", "bc", ""]
    assert not decision.finished


texts = st.text(alphabet="ab c", max_size=40)
stop_strings = st.text(alphabet="ab c", min_size=1, max_size=4)


@st.composite
def split(draw, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(data=st.data(), text=texts, stop=stop_strings, include=st.booleans())
def test_emitted_text_is_text_cut_at_first_stop_string(data, text, stop, include):
    deltas = data.draw(split(text))
    stop_checker = checker(stop=(stop,), include_stop_str_in_output=include)
    emitted, decision = feed(stop_checker, deltas)
    found = text.find(stop)
    if found >= 0:
        assert decision.finished and decision.reason == "stop"
        assert "".join(emitted) == text[: found + len(stop) if include else found]
    else:
        assert not (decision and decision.finished)
        assert "".join(emitted) + stop_checker.flush() == text


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    text=texts,
    stops=st.lists(stop_strings, min_size=1, max_size=3),
    include=st.booleans(),
)
def test_several_stop_strings_match_character_by_character_reading(data, text, stops, include):
    deltas = data.draw(split(text))
    stop_checker = checker(stop=tuple(stops), include_stop_str_in_output=include)
    emitted, decision = feed(stop_checker, deltas)
    want, stopped = expected_cut(text, stops, include)
    if not stopped:
        emitted.append(stop_checker.flush())
    assert "".join(emitted) == want
    assert bool(decision and decision.finished) == stopped


# --- stop tokens ----------------------------------------------------------------------


def test_eos_stops_and_its_text_is_not_shown():
    emitted, decision = feed(checker(), ["Hi", "</s>"], token_ids=[PLAIN, EOS])
    assert emitted == ["Hi", ""]
    assert decision == StopDecision(finished=True, reason="stop", text="")


def test_eos_releases_held_back_text():
    emitted, decision = feed(checker(stop=("abc",)), ["xab", ""], token_ids=[PLAIN, EOS])
    assert emitted == ["x", "ab"]
    assert decision.reason == "stop"


def test_ignore_eos_keeps_going():
    emitted, decision = feed(checker(ignore_eos=True), ["Hi", "</s>", "!"], [PLAIN, EOS, PLAIN])
    assert emitted == ["Hi", "</s>", "!"]
    assert not decision.finished


def test_stop_token_ids_stop_even_with_ignore_eos():
    params = {"stop_token_ids": (7,), "ignore_eos": True}
    emitted, decision = feed(checker(**params), ["a", "<7>", "b"], token_ids=[PLAIN, 7, PLAIN])
    assert emitted == ["a", ""]
    assert decision.reason == "stop"


def test_stop_token_text_shown_when_asked():
    params = {"stop_token_ids": (7,), "include_stop_str_in_output": True}
    emitted, decision = feed(checker(**params), ["a", "<7>"], token_ids=[PLAIN, 7])
    assert emitted == ["a", "<7>"]
    assert decision.reason == "stop"


# --- length ---------------------------------------------------------------------------


def test_max_tokens_finishes_with_length_and_releases_held_text():
    emitted, decision = feed(checker(max_tokens=2, stop=("abc",)), ["x", "ab", "c"])
    assert emitted == ["x", "ab"]
    assert decision == StopDecision(finished=True, reason="length", text="ab")


def test_max_model_len_finishes_with_length():
    stop_checker = checker(max_model_len=12)
    first = stop_checker.check(PLAIN, "a", num_output_tokens=1, num_total_tokens=11)
    second = stop_checker.check(PLAIN, "b", num_output_tokens=2, num_total_tokens=12)
    assert not first.finished
    assert second == StopDecision(finished=True, reason="length", text="b")


def test_stop_wins_over_length_on_the_same_token():
    emitted, decision = feed(checker(max_tokens=2), ["a", ""], token_ids=[PLAIN, EOS])
    assert decision.reason == "stop"
    emitted, decision = feed(checker(max_tokens=2, stop=("b",)), ["a", "bc"])
    assert decision.reason == "stop"
    assert emitted == ["a", ""]


def test_check_after_finish_is_an_error():
    stop_checker = checker(max_tokens=1)
    assert stop_checker.check(PLAIN, "a", 1, 11).finished
    with pytest.raises(RuntimeError):
        stop_checker.check(PLAIN, "b", 2, 12)
