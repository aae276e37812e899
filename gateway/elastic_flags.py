"""`moe-serve serve`'s expert-plane flags (issue 16) → ElasticConfig.

--rebalance turns on live rebalancing and --expert-autoscaling the scaling of each model group's
expert-worker pool; the other flags tune one of them and are refused without it, so a tuning
flag never silently does nothing. Given values go through gateway/elastic_options.py, as a Serve
config's `rebalance:` and `expert_autoscaling:` do. Standard library and dataclasses only:
`moe-serve --help` stays instant.
"""

from __future__ import annotations

import argparse
import math

from cluster.elastic_config import ElasticConfig, ExpertAutoscalingConfig, RebalanceConfig

# flag → the RebalanceConfig / ExpertAutoscalingConfig field it sets
REBALANCE_FLAGS = {"--rebalance-threshold": "threshold", "--rebalance-interval": "interval_s",
                   "--rebalance-window": "window_s", "--expert-replicas-per-layer": "extra_copies_per_layer"}
AUTOSCALING_FLAGS = {"--min-expert-workers": "min_workers", "--max-expert-workers": "max_workers",
                     "--expert-upscale-busy": "upscale_busy", "--expert-downscale-busy": "downscale_busy",
                     "--expert-upscale-delay": "upscale_delay_s",
                     "--expert-downscale-delay": "downscale_delay_s"}


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_elastic_arguments(parser: argparse.ArgumentParser) -> None:
    r, a = RebalanceConfig(), ExpertAutoscalingConfig()
    group = parser.add_argument_group(
        "expert plane", "Each model group can move its hot experts between expert workers while serving "
                        "(--rebalance) and grow or shrink its expert-worker pool with their load "
                        "(--expert-autoscaling); both need --expert-workers > 0.")
    group.add_argument("--rebalance", action="store_true",
                       help="move experts between expert workers while serving when their load is "
                            "unbalanced (default: off)")
    group.add_argument("--rebalance-threshold", type=finite_float, metavar="F",
                       help="imbalance (max / mean tokens per expert worker) that calls for a move "
                            f"(default {r.threshold:g})")
    group.add_argument("--rebalance-interval", type=finite_float, metavar="S",
                       help=f"seconds between looks at the expert load (default {r.interval_s:g})")
    group.add_argument("--rebalance-window", type=finite_float, metavar="S",
                       help=f"seconds of expert load each look weighs (default {r.window_s:g})")
    group.add_argument("--expert-replicas-per-layer", type=int, metavar="N",
                       help="extra copies of the hottest experts a new placement may add per layer "
                            f"(default {r.extra_copies_per_layer})")
    group.add_argument("--expert-autoscaling", action="store_true",
                       help="add and remove expert workers with their busy fraction (default: off)")
    group.add_argument("--min-expert-workers", type=int, metavar="N",
                       help="fewest expert workers per model group (default: --expert-workers)")
    group.add_argument("--max-expert-workers", type=int, metavar="N",
                       help="most expert workers per model group (default: --expert-workers); the ones "
                            "above --expert-workers are not reserved at start: the cluster needs room")
    group.add_argument("--expert-upscale-busy", type=finite_float, metavar="F",
                       help="busy fraction of the expert workers above which one is added "
                            f"(default {a.upscale_busy:g})")
    group.add_argument("--expert-downscale-busy", type=finite_float, metavar="F",
                       help=f"... and below which one is removed (default {a.downscale_busy:g})")
    group.add_argument("--expert-upscale-delay", type=finite_float, metavar="S",
                       help="seconds the load must stay high before a worker is added "
                            f"(default {a.upscale_delay_s:g})")
    group.add_argument("--expert-downscale-delay", type=finite_float, metavar="S",
                       help="seconds it must stay low before one is removed "
                            f"(default {a.downscale_delay_s:g})")


def elastic_from_args(args: argparse.Namespace) -> ElasticConfig:
    """The expert-plane flags → ElasticConfig (each concern off unless its switch is given)."""
    from gateway.elastic_options import expert_autoscaling_config, rebalance_config

    rebalance = _given(args, REBALANCE_FLAGS, switch="--rebalance", on=args.rebalance)
    autoscaling = _given(args, AUTOSCALING_FLAGS, switch="--expert-autoscaling", on=args.expert_autoscaling)
    return ElasticConfig(
        rebalance=rebalance_config(rebalance, "--rebalance") if args.rebalance else RebalanceConfig(),
        autoscaling=(expert_autoscaling_config(autoscaling, "--expert-autoscaling") if args.expert_autoscaling
                     else ExpertAutoscalingConfig()),
    )


def _given(args: argparse.Namespace, flags: dict[str, str], *, switch: str, on: bool) -> dict:
    given = {flag: getattr(args, _dest(flag)) for flag in flags if getattr(args, _dest(flag)) is not None}
    if given and not on:
        raise ValueError(f"{', '.join(given)} only apply with {switch}")
    return {flags[flag]: value for flag, value in given.items()}


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")
