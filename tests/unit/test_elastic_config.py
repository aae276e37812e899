"""The expert plane's settings refuse what no policy could act on (cluster/elastic_config.py)."""

from __future__ import annotations

import math

import pytest

from cluster.elastic_config import ExpertAutoscalingConfig, RebalanceConfig


@pytest.mark.parametrize("field", ["window_s", "interval_s", "threshold", "min_gain", "cooldown_s"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_rebalance_settings_must_be_finite(field, value):
    with pytest.raises(ValueError, match=f"{field} must be finite"):
        RebalanceConfig(**{field: value})


@pytest.mark.parametrize("field", ["upscale_busy", "downscale_busy", "upscale_delay_s", "interval_s"])
def test_autoscaling_settings_must_be_finite(field):
    with pytest.raises(ValueError, match=f"{field} must be finite"):
        ExpertAutoscalingConfig(**{field: math.nan})


def test_bounds_default_to_the_starting_size_and_never_cross():
    assert ExpertAutoscalingConfig().bounds(3) == (3, 3)
    assert ExpertAutoscalingConfig(max_workers=5).bounds(3) == (3, 5)
    assert ExpertAutoscalingConfig(min_workers=1).bounds(3) == (1, 3)
    lo, hi = ExpertAutoscalingConfig(max_workers=3).bounds(4)
    assert lo <= hi == 3
    with pytest.raises(ValueError, match="max_workers"):
        ExpertAutoscalingConfig(min_workers=4, max_workers=2)
    with pytest.raises(ValueError, match="threshold"):
        RebalanceConfig(threshold=0.9)
