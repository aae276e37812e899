"""Autoscaling options: validated when built, accepted by Ray's own AutoscalingConfig, wired by
`build_app` and the `moe-serve serve` flags (no Ray started: milliseconds)."""

from __future__ import annotations

import pytest
from ray.serve.config import AutoscalingConfig

from gateway.autoscaling import AutoscalingOptions


@pytest.mark.parametrize("fields", [
    dict(min_replicas=0),  # no scale-to-zero
    dict(min_replicas=3, max_replicas=2),
    dict(initial_replicas=3, max_replicas=2),
    dict(target_ongoing_requests=0),
    dict(upscale_delay_s=-1),
    dict(downscale_delay_s=-1),
    dict(metrics_interval_s=0),
    dict(look_back_period_s=0),
])
def test_bad_options_are_refused(fields):
    with pytest.raises(ValueError):
        AutoscalingOptions(**fields)


def test_serve_config_is_rays_autoscaling_config():
    options = AutoscalingOptions(min_replicas=2, max_replicas=5, initial_replicas=3,
                                 target_ongoing_requests=4, upscale_delay_s=7, downscale_delay_s=70,
                                 look_back_period_s=12)
    ray_config = AutoscalingConfig(**options.serve_config())
    for name, value in options.serve_config().items():
        assert getattr(ray_config, name) == value, name
    assert "initial_replicas" not in AutoscalingOptions().serve_config()  # None: Ray's default (min)


def engine_config(options):
    """The engine deployment's DeploymentConfig inside the app `build_app` composes."""
    from gateway.app import build_app

    ingress = build_app(options)._bound_deployment
    engine = next(arg for arg in ingress.init_args if hasattr(arg, "_bound_deployment"))
    return engine._bound_deployment._deployment_config


def test_build_app_passes_autoscaling_or_a_fixed_count(demo_tokenizer_dir):
    from gateway.app import ServeOptions

    scaled = engine_config(ServeOptions(
        model_dir=str(demo_tokenizer_dir), num_expert_workers=0, graceful_shutdown_timeout_s=45,
        graceful_shutdown_wait_loop_s=0.5, autoscaling=AutoscalingOptions(max_replicas=4, upscale_delay_s=3)))
    assert (scaled.autoscaling_config.max_replicas, scaled.autoscaling_config.upscale_delay_s) == (4, 3)
    assert "num_replicas" not in scaled.user_configured_option_names
    assert (scaled.graceful_shutdown_timeout_s, scaled.graceful_shutdown_wait_loop_s) == (45, 0.5)
    fixed = engine_config(ServeOptions(model_dir=str(demo_tokenizer_dir), num_expert_workers=0,
                                       num_engine_replicas=3))
    assert fixed.autoscaling_config is None and fixed.num_replicas == 3
    with pytest.raises(ValueError):
        ServeOptions(model_dir=".", num_expert_workers=0, graceful_shutdown_timeout_s=0)


def test_cli_flags():
    from gateway.cli import autoscaling_from_args, build_parser

    def parse(*flags):
        return autoscaling_from_args(build_parser().parse_args(["serve", *flags]))

    assert parse() is None
    assert parse("--max-replicas", "4", "--min-replicas", "2", "--target-ongoing-requests", "8",
                 "--upscale-delay-s", "5", "--downscale-delay-s", "120") == AutoscalingOptions(
        min_replicas=2, max_replicas=4, target_ongoing_requests=8, upscale_delay_s=5, downscale_delay_s=120)
    assert parse("--max-replicas", "3") == AutoscalingOptions(max_replicas=3)
    with pytest.raises(ValueError, match="--min-replicas only apply with --max-replicas"):
        parse("--min-replicas", "2")
    with pytest.raises(ValueError, match="--engine-replicas"):
        parse("--engine-replicas", "2", "--max-replicas", "3")
    with pytest.raises(ValueError, match="max_replicas"):
        parse("--max-replicas", "1", "--min-replicas", "2")
    args = build_parser().parse_args(["serve", "--graceful-shutdown-timeout-s", "90"])
    assert args.graceful_shutdown_timeout_s == 90
