import dataclasses

import pytest

from workers.model.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_match_openai():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, -1, 0.0)
    assert p.seed is None and p.stop == () and p.stop_token_ids == ()
    assert not (p.ignore_eos or p.logprobs or p.include_stop_str_in_output)
    assert not p.is_greedy


def test_zero_temperature_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0).temperature == 0.0
    assert isinstance(SamplingParams(temperature=0).temperature, float)
    assert not SamplingParams(temperature=0.7).is_greedy


def test_is_frozen_and_hashable():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[2, 3])
    assert p.stop == ("a", "b") and p.stop_token_ids == (2, 3)
    assert hash(p) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(2, 3)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 3  # type: ignore[misc]


def test_stop_accepts_one_string():
    assert SamplingParams(stop="\n").stop == ("\n",)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "1"),
        ("top_p", 0),
        ("top_p", 1.01),
        ("top_p", -1),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("seed", 1.0),
        ("seed", "7"),
        ("seed", 2**64),
        ("stop", ["ok", ""]),
        ("stop", [1]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["2"]),
        ("stop_token_ids", 2),
        ("ignore_eos", 1),
        ("logprobs", "yes"),
        ("include_stop_str_in_output", None),
    ],
)
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=f"^{field} ") as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, SamplingParamsError)
    assert info.value.field == field


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 1},
        {"top_p": 1},
        {"top_p": 1e-6},
        {"min_p": 0},
        {"min_p": 1},
        {"seed": 0},
        {"seed": -(2**63)},
        {"seed": 2**64 - 1},
        {"max_tokens": 1},
    ],
)
def test_boundaries_are_accepted(kwargs):
    SamplingParams(**kwargs)
