"""The application builder a Serve config file points at: `import_path: gateway.serve_config:app_builder`.

`serve run deploy/serve-demo.yaml`, `serve deploy ...` and KubeRay's `serveConfigV2` all call
`app_builder(args)` with the application's `args:` mapping, inside the cluster (Serve's
controller runs the build). The keys are `ServeOptions` fields, so a config file and
`moe-serve serve` flags say the same thing; the few that need a conversion:

    model_dir        absent or null: the built-in demo checkpoint (written once on that node)
    expert_replicas  "L:E=N,..." as on the command line, or a mapping {"L:E": N}
    autoscaling      a mapping of `gateway.autoscaling.AutoscalingOptions` fields
    rebalance        live rebalancing of each model group's experts, on: a mapping of
                     `cluster.elastic_config.RebalanceConfig` fields ({} for the defaults)
    expert_autoscaling  scaling of each model group's expert workers, on: a mapping of
                     `ExpertAutoscalingConfig` fields (min_workers, max_workers, upscale_busy, ...)
    api_key          absent: $MOE_SERVE_API_KEY (a Kubernetes Secret), so no key is in the file

`rebalance` and `expert_autoscaling` together make the `elastic` field, which is not a key itself.

`host`, `port` and `grpc_port` are refused: under a config file Serve's proxies listen where its
top-level `http_options` and `grpc_options` say, and two places to set one port is one too many.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ray import serve

from cluster.elastic_config import ElasticConfig
from gateway.app import ServeOptions, build_app
from gateway.autoscaling import AutoscalingOptions
from gateway.demo_checkpoint import ensure_demo_checkpoint
from gateway.elastic_options import expert_autoscaling_config, rebalance_config
from gateway.serve_command import parse_expert_replicas

API_KEY_ENV = "MOE_SERVE_API_KEY"
PROXY_FIELDS = frozenset({"host", "port", "grpc_port"})  # Serve's http_options / grpc_options own these
ELASTIC_KEYS = frozenset({"rebalance", "expert_autoscaling"})  # → ServeOptions.elastic
OPTION_FIELDS = (frozenset(f.name for f in dataclasses.fields(ServeOptions)) - PROXY_FIELDS - {"elastic"}
                 | ELASTIC_KEYS)


def app_builder(args: dict) -> serve.Application:
    return build_app(serve_options_from_args(args))


def serve_options_from_args(args: Mapping[str, Any]) -> ServeOptions:
    """A config file's `args:` → `ServeOptions`; any key it does not know is an error, never ignored."""
    args = dict(args or {})
    if misplaced := sorted(PROXY_FIELDS & args.keys()):
        raise ValueError(f"args {misplaced}: set ports and hosts in the config's http_options / grpc_options")
    if unknown := sorted(args.keys() - OPTION_FIELDS):
        raise ValueError(f"unknown args {unknown}; known: {sorted(OPTION_FIELDS)}")
    if args.get("model_dir") is None:
        args["model_dir"] = str(ensure_demo_checkpoint(progress=False))
    if "expert_replicas" in args:
        args["expert_replicas"] = expert_replicas_from_arg(args["expert_replicas"])
    if isinstance(args.get("autoscaling"), Mapping):
        try:
            args["autoscaling"] = AutoscalingOptions(**args["autoscaling"])
        except TypeError as exc:  # an unknown or missing key: say so as a config error
            raise ValueError(f"args.autoscaling: {exc}") from None
    if args.get("api_key") is None:
        args["api_key"] = os.environ.get(API_KEY_ENV) or None
    args["elastic"] = elastic_from_config(args.pop("rebalance", None), args.pop("expert_autoscaling", None))
    return ServeOptions(**args)


def elastic_from_config(rebalance: Mapping[str, Any] | None,
                        expert_autoscaling: Mapping[str, Any] | None) -> ElasticConfig:
    """`rebalance:` and `expert_autoscaling:` → ElasticConfig; each present one is on (null: off)."""
    return ElasticConfig(
        **({} if rebalance is None else {"rebalance": rebalance_config(rebalance, "args.rebalance")}),
        **({} if expert_autoscaling is None else
           {"autoscaling": expert_autoscaling_config(expert_autoscaling, "args.expert_autoscaling")}),
    )


def expert_replicas_from_arg(value: str | Mapping[str, int] | None) -> dict[tuple[int, int], int]:
    """The command line's "L:E=N,..." or a mapping {"L:E": N} → {(L, E): N}."""
    if value is None:
        return {}
    if isinstance(value, str):
        return parse_expert_replicas(value)
    return parse_expert_replicas(",".join(f"{where}={copies}" for where, copies in value.items()))
