"""The expert plane's settings as `moe-serve serve` and a Serve config give them → ElasticConfig.

Both ways in say the same thing: the flags of gateway/elastic_flags.py and a config's
`rebalance:` and `expert_autoscaling:` mappings become a mapping of the given fields, and one
function per concern turns it into the frozen config (cluster/elastic_config.py). Giving a
concern at all turns it on, so `enabled` is not a key; any other key the config does not have is
refused, never ignored. Numbers must be finite: the configs compare them (`x < 1`), and every
comparison with NaN is false, so a NaN would slip through their own checks.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

from cluster.elastic_config import ElasticConfig, ExpertAutoscalingConfig, RebalanceConfig


def rebalance_config(values: Mapping[str, Any], where: str) -> RebalanceConfig:
    """Live rebalancing, on, with the given fields (`where` names them in errors: "args.rebalance")."""
    return _enabled(RebalanceConfig, values, where)


def expert_autoscaling_config(values: Mapping[str, Any], where: str) -> ExpertAutoscalingConfig:
    """Expert-worker autoscaling, on, with the given fields."""
    return _enabled(ExpertAutoscalingConfig, values, where)


def keys_of(config_type: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_type) if f.name != "enabled"]


def check_expert_plane(elastic: ElasticConfig, num_expert_workers: int) -> None:
    """What ServeOptions refuses: an expert plane without expert workers, and an autoscaled pool
    that starts outside its own bounds."""
    if not (elastic.rebalance.enabled or elastic.autoscaling.enabled):
        return
    if num_expert_workers == 0:
        raise ValueError("rebalance and expert autoscaling need expert workers (num_expert_workers / "
                         "--expert-workers > 0): the single-process engine has no expert plane")
    if elastic.autoscaling.enabled:
        # The group starts with its configured workers, so they must lie within the bounds
        # (an unset bound is the starting count, so only a set one can exclude it).
        lo, hi = elastic.autoscaling.bounds(num_expert_workers)
        start = f"the starting {num_expert_workers} expert workers (--expert-workers / num_expert_workers)"
        if num_expert_workers > hi:
            raise ValueError(f"expert autoscaling: --max-expert-workers / max_workers ({hi}) is below "
                             f"{start}")
        if num_expert_workers < lo:
            raise ValueError(f"expert autoscaling: --min-expert-workers / min_workers ({lo}) is above "
                             f"{start}")


def _enabled(config_type: type, values: Mapping[str, Any], where: str):
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a mapping of {keys_of(config_type)}, got {values!r}")
    if unknown := sorted(values.keys() - set(keys_of(config_type))):
        raise ValueError(f"{where}: unknown keys {unknown}; known: {keys_of(config_type)}")
    hints = typing.get_type_hints(config_type)
    for key, value in values.items():
        _check_number(f"{where}.{key}", value, hints[key])
    try:
        return config_type(enabled=True, **values)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _check_number(name: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return
    if int in allowed:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
