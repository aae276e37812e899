"""`moe-serve bench`'s prompts and options: lengths, files, and parsing of the CLI's values."""

from __future__ import annotations

import json
import math

import pytest

from gateway.bench.config import (
    DatasetConfig,
    LoadConfig,
    ReportConfig,
    TargetConfig,
    parse_float_list,
    parse_goodput,
)
from gateway.bench.dataset import file_requests, length_range, load_requests, random_requests


def test_fixed_lengths_are_exact():
    reqs = random_requests(DatasetConfig(num_prompts=30, input_len=17, output_len=5, vocab_size=100))
    assert len(reqs) == 30
    assert all(r.input_len == 17 and len(r.prompt) == 17 and r.output_len == 5 for r in reqs)
    assert all(0 <= t < 100 for r in reqs for t in r.prompt)


def test_range_ratio_draws_lengths_within_bounds_and_covers_them():
    cfg = DatasetConfig(num_prompts=2000, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    reqs = random_requests(cfg)
    assert length_range(100, 0.5) == (50, 150) and length_range(20, 0.5) == (10, 30)
    ins, outs = [r.input_len for r in reqs], [r.output_len for r in reqs]
    assert (min(ins), max(ins)) == (50, 150) and (min(outs), max(outs)) == (10, 30)
    assert sum(ins) / len(ins) == pytest.approx(100, rel=0.03)


def test_the_same_seed_gives_the_same_prompts():
    cfg = DatasetConfig(num_prompts=5, input_len=8, range_ratio=0.25, seed=9)
    assert random_requests(cfg) == random_requests(cfg)
    other_seed = DatasetConfig(num_prompts=5, input_len=8, range_ratio=0.25, seed=10)
    assert random_requests(cfg) != random_requests(other_seed)


def test_text_file_prompts_cycle_with_drawn_output_lengths(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello there\n\nThe capital of France is\n")
    reqs = load_requests(DatasetConfig(name="file", path=str(path), num_prompts=5, output_len=7))
    assert [r.prompt for r in reqs] == ["Hello there", "The capital of France is"] * 2 + ["Hello there"]
    assert all(r.output_len == 7 and r.input_len is None for r in reqs)


def test_jsonl_prompts_keep_their_own_output_lengths(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [{"prompt": "a b c", "output_len": 3},
                                                          {"prompt": [5, 6, 7, 8]},
                                                          {"prompt": "x", "max_tokens": 2}]))
    reqs = file_requests(DatasetConfig(name="file", path=str(path), num_prompts=3, output_len=11))
    assert [(r.prompt, r.output_len) for r in reqs] == [("a b c", 3), ((5, 6, 7, 8), 11), ("x", 2)]
    assert reqs[1].input_len == 4


@pytest.mark.parametrize("line", ['{"text": "no prompt"}', '{"prompt": ""}',
                                  '{"prompt": "a", "output_len": 0}', "not json", "[1, 2]"])
def test_bad_jsonl_lines_are_refused_with_their_line_number(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        file_requests(DatasetConfig(name="file", path=str(path), num_prompts=2))


def test_goodput_and_list_parsing():
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:3000"]) == (("ttft", 500.0), ("tpot", 50.5),
                                                                      ("e2el", 3000.0))
    for bad in (["ttft"], ["ttft:"], ["ttft:-1"], ["speed:5"], ["ttft:abc"], ["ttft:inf"]):
        with pytest.raises(ValueError, match="METRIC:MS"):
            parse_goodput(bad)
    assert parse_float_list("1, 2,4.5", "rates") == (1.0, 2.0, 4.5)
    assert parse_float_list("inf", "rates") == (math.inf,)
    with pytest.raises(ValueError, match="rates"):
        parse_float_list("1,x", "rates")


@pytest.mark.parametrize("build", [
    lambda: TargetConfig(backend="websocket"),
    lambda: TargetConfig(base_url="127.0.0.1:8000"),
    lambda: DatasetConfig(name="sharegpt"),
    lambda: DatasetConfig(name="file"),
    lambda: DatasetConfig(num_prompts=0),
    lambda: DatasetConfig(range_ratio=1.0),
    lambda: LoadConfig(request_rate=0),
    lambda: LoadConfig(burstiness=0),
    lambda: LoadConfig(max_concurrency=0),
    lambda: LoadConfig(max_duration_s=0),
    lambda: ReportConfig(percentiles=(0,)),
    lambda: ReportConfig(percentile_metrics=("ttft", "speed")),
])
def test_bad_options_are_refused_when_built(build):
    with pytest.raises(ValueError):
        build()
