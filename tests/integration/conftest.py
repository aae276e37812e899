"""Fixtures the integration modules share."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="module")
def ray_local():
    """A one-node local Ray for the module (4 logical CPUs; actors take fractions of them)."""
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()
