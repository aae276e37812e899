"""The expert plane's settings (issue 16) from `moe-serve serve` flags and from a Serve config's
args → ElasticConfig, their refusals, and where they go: EngineOptions, the cluster-fit demand,
the banner."""

from __future__ import annotations

import math
import re

import pytest

from cluster.elastic_config import ElasticConfig, ExpertAutoscalingConfig, RebalanceConfig
from gateway.app import ServeOptions, resource_demand
from gateway.cli import build_parser, main
from gateway.elastic_flags import elastic_from_args
from gateway.serve_banner import banner, expert_plane_lines
from gateway.serve_config import serve_options_from_args


def parse(*flags: str) -> ElasticConfig:
    return elastic_from_args(build_parser().parse_args(["serve", *flags]))


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # enough for `serve` to pass its checkpoint check
    return tmp_path


# -- flags ----------------------------------------------------------------------------------------


def test_no_flags_leave_the_expert_plane_off():
    assert parse() == ElasticConfig()
    assert not parse().rebalance.enabled and not parse().autoscaling.enabled


def test_rebalance_flags():
    assert parse("--rebalance") == ElasticConfig(rebalance=RebalanceConfig(enabled=True))
    got = parse("--rebalance", "--rebalance-threshold", "1.5", "--rebalance-interval", "3",
                "--rebalance-window", "45", "--expert-replicas-per-layer", "2")
    assert got == ElasticConfig(rebalance=RebalanceConfig(enabled=True, threshold=1.5, interval_s=3.0,
                                                          window_s=45.0, extra_copies_per_layer=2))
    assert got.autoscaling == ExpertAutoscalingConfig()


def test_expert_autoscaling_flags():
    assert parse("--expert-autoscaling") == ElasticConfig(autoscaling=ExpertAutoscalingConfig(enabled=True))
    got = parse("--expert-autoscaling", "--min-expert-workers", "1", "--max-expert-workers", "4",
                "--expert-upscale-busy", "0.7", "--expert-downscale-busy", "0.1",
                "--expert-upscale-delay", "5", "--expert-downscale-delay", "30")
    assert got.autoscaling == ExpertAutoscalingConfig(
        enabled=True, min_workers=1, max_workers=4, upscale_busy=0.7, downscale_busy=0.1,
        upscale_delay_s=5.0, downscale_delay_s=30.0)
    assert got.rebalance == RebalanceConfig()


@pytest.mark.parametrize(("flags", "message"), [
    (["--rebalance-threshold", "1.5"], "--rebalance-threshold only apply with --rebalance"),
    (["--expert-replicas-per-layer", "1", "--expert-autoscaling"],
     "--expert-replicas-per-layer only apply with --rebalance"),
    (["--max-expert-workers", "4", "--expert-upscale-delay", "3", "--rebalance"],
     "--max-expert-workers, --expert-upscale-delay only apply with --expert-autoscaling"),
])
def test_a_tuning_flag_without_its_switch_is_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        parse(*flags)


def test_config_checks_surface_with_the_flag_group():
    with pytest.raises(ValueError, match=r"^--rebalance: rebalance threshold .* got 0.5"):
        parse("--rebalance", "--rebalance-threshold", "0.5")
    with pytest.raises(ValueError, match=r"^--expert-autoscaling: .*downscale_busy < upscale_busy"):
        parse("--expert-autoscaling", "--expert-upscale-busy", "0.2", "--expert-downscale-busy", "0.5")


@pytest.mark.parametrize("flags", [
    ["--rebalance", "--rebalance-threshold", "nan"],
    ["--rebalance", "--rebalance-window", "inf"],
    ["--expert-autoscaling", "--expert-upscale-delay", "abc"],
    ["--expert-autoscaling", "--max-expert-workers", "2.5"],
])
def test_a_non_finite_or_malformed_number_is_a_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", *flags])
    assert exit_.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--expert-workers", "0", "--rebalance"], "the single-process engine has no expert plane"),
    (["--expert-workers", "0", "--expert-autoscaling"], "the single-process engine has no expert plane"),
    (["--expert-workers", "2", "--expert-autoscaling", "--max-expert-workers", "1"],
     r"--max-expert-workers / max_workers \(1\) is below the starting 2 expert workers"),
    (["--expert-workers", "2", "--expert-autoscaling", "--min-expert-workers", "3"],
     r"--min-expert-workers / min_workers \(3\) is above the starting 2 expert workers"),
    (["--expert-workers", "4", "--expert-autoscaling", "--min-expert-workers", "1",
      "--max-expert-workers", "3"], r"max_workers \(3\) is below the starting 4"),
    (["--rebalance", "--rebalance-interval", "0"], "interval_s must be > 0"),
])
def test_serve_refuses_bad_combinations_at_start_in_one_line(flags, message, model_dir, capsys):
    assert main(["serve", "--model", str(model_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-serve serve: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(message, err), err


def test_expert_autoscaling_may_start_anywhere_in_its_bounds():
    for start, flags in ((2, ["--max-expert-workers", "4"]), (2, ["--min-expert-workers", "1"]),
                         (3, ["--min-expert-workers", "2", "--max-expert-workers", "3"])):
        elastic = parse("--expert-autoscaling", *flags)
        assert ServeOptions(model_dir=".", num_expert_workers=start, elastic=elastic).elastic == elastic


# -- the Serve config's args ----------------------------------------------------------------------


def test_config_keys_turn_each_concern_on(demo_tokenizer_dir):
    def elastic(**args) -> ElasticConfig:
        return serve_options_from_args({"model_dir": str(demo_tokenizer_dir), **args}).elastic

    assert elastic() == ElasticConfig()
    assert elastic(rebalance=None, expert_autoscaling=None) == ElasticConfig()
    assert elastic(rebalance={}) == ElasticConfig(rebalance=RebalanceConfig(enabled=True))
    every_rebalance = {"threshold": 1.2, "interval_s": 5, "window_s": 60, "min_gain": 0.2,
                       "extra_copies_per_layer": 1, "min_tokens": 512, "cooldown_s": 20}
    every_scaling = {"min_workers": 2, "max_workers": 4, "upscale_busy": 0.7, "downscale_busy": 0.3,
                     "upscale_delay_s": 60, "downscale_delay_s": 600, "interval_s": 5}
    got = elastic(rebalance=every_rebalance, expert_autoscaling=every_scaling)
    assert got == ElasticConfig(rebalance=RebalanceConfig(enabled=True, **every_rebalance),
                                autoscaling=ExpertAutoscalingConfig(enabled=True, **every_scaling))


@pytest.mark.parametrize(("args", "message"), [
    ({"rebalance": {"treshold": 1.2}}, r"args.rebalance: unknown keys \['treshold'\]; known: \['window_s'"),
    ({"rebalance": {"enabled": True}}, r"args.rebalance: unknown keys \['enabled'\]"),
    ({"expert_autoscaling": {"max_replicas": 4}},
     r"args.expert_autoscaling: unknown keys \['max_replicas'\]"),
    ({"elastic": {}}, r"unknown args \['elastic'\]"),
    ({"rebalance": 1.3}, "args.rebalance must be a mapping"),
    ({"rebalance": {"threshold": math.nan}}, "args.rebalance.threshold must be a finite number"),
    ({"rebalance": {"threshold": "high"}}, "args.rebalance.threshold must be a finite number"),
    ({"rebalance": {"extra_copies_per_layer": 1.5}}, "extra_copies_per_layer must be a whole number"),
    ({"expert_autoscaling": {"max_workers": True}}, "max_workers must be a whole number"),
    ({"expert_autoscaling": {"upscale_busy": 2}}, "args.expert_autoscaling: .*upscale_busy <= 1"),
    ({"num_expert_workers": 0, "rebalance": {}}, "single-process engine has no expert plane"),
])
def test_config_refusals(args, message, demo_tokenizer_dir):
    with pytest.raises(ValueError, match=message):
        serve_options_from_args({"model_dir": str(demo_tokenizer_dir), **args})


def test_null_bounds_mean_the_starting_count(demo_tokenizer_dir):
    options = serve_options_from_args({"model_dir": str(demo_tokenizer_dir), "num_expert_workers": 3,
                                       "expert_autoscaling": {"min_workers": None, "max_workers": 5}})
    assert options.elastic.autoscaling.bounds(options.num_expert_workers) == (3, 5)


# -- where the config goes -----------------------------------------------------------------------


def test_the_engine_replica_gets_it_and_the_cluster_reserves_only_the_starting_workers():
    fixed = ServeOptions(model_dir=".", num_expert_workers=2)
    elastic = parse("--rebalance", "--expert-autoscaling", "--max-expert-workers", "6")
    scaling = ServeOptions(model_dir=".", num_expert_workers=2, elastic=elastic)
    assert scaling.engine_options().elastic == elastic
    assert fixed.engine_options().elastic == ElasticConfig()
    # Workers above the starting two are found room for when they are added, not reserved now.
    assert resource_demand(scaling) == resource_demand(fixed)
    assert len(resource_demand(scaling)) == 1 + 1 + 1 + 2  # ingress, replica, attention, 2 experts


def test_banner_says_what_the_expert_plane_does():
    def line(*flags: str, workers: int = 2) -> list[str]:
        return expert_plane_lines(ServeOptions(model_dir=".", num_expert_workers=workers,
                                               elastic=parse(*flags)))

    assert line() == []
    assert line("--rebalance", "--expert-autoscaling", "--max-expert-workers", "4") == [
        "  expert plane rebalance on (threshold 1.3), expert workers 2..4 (autoscaling from 2)"]
    assert line("--rebalance", "--rebalance-threshold", "1.5", "--expert-replicas-per-layer", "1") == [
        "  expert plane rebalance on (threshold 1.5, 1 extra expert copy per layer), "
        "2 expert workers (fixed)"]
    assert line("--expert-autoscaling", "--min-expert-workers", "1", workers=3) == [
        "  expert plane rebalance off, expert workers 1..3 (autoscaling from 3)"]
    text = banner(ServeOptions(model_dir=".", elastic=parse("--rebalance")), grpc=False, key_from_env=False)
    layout = next(i for i, line in enumerate(text.splitlines()) if line.startswith("  layout"))
    assert text.splitlines()[layout + 1].startswith("  expert plane rebalance on (threshold 1.3)")
