"""Before `serve.run`: does the cluster have what the application will ask for?

Serve places each engine replica's placement group (its model group) and waits for it
forever if it cannot be placed. On a cluster this process started there is no autoscaler to
bring more, so a shortfall is an error at once, naming the resources; on a joined cluster an
autoscaler (KubeRay's) may add nodes, so it is a warning and Serve waits.
"""

from __future__ import annotations

import logging

from cluster.resource_check import describe_missing
from gateway.app import ServeOptions, resource_demand

log = logging.getLogger(__name__)


class ClusterTooSmall(RuntimeError):
    pass


def check_cluster_fits(options: ServeOptions, available: dict[str, float], *, joined: bool) -> str:
    """'' when it fits; else the shortfall (raised as ClusterTooSmall on a cluster of our own)."""
    short = describe_missing(resource_demand(options), available)
    if not short:
        return ""
    hint = (" (--gpus reserves one GPU per worker; --gpus-per-worker 0.25 lets four share one)"
            if "GPU" in short else "")
    message = f"the cluster cannot hold this application: {short}{hint}"
    if not joined:
        raise ClusterTooSmall(message)
    log.warning("%s; waiting for the cluster (an autoscaler) to add it", message)
    return message
