"""The GCS's view of an actor: ALIVE, RESTARTING, DEAD, ... ("" when unknown).

The one place that imports a private Ray module, and why: Ray 2.60's public state API
(`ray.util.state.get_actor`) asks the dashboard's HTTP server, which a cluster may run without
(`include_dashboard=False`, `ray start --include-dashboard=false`); `ray._private.state` reads
the GCS actor table behind it, which is always there. A group restart needs the answer to know
when Ray has let the old workers go (cluster/group_restart.py).
"""

from __future__ import annotations


def actor_state(actor) -> str:
    from ray._private import state

    return state.actors(actor_id=actor._actor_id.hex()).get("State", "")
