"""What Ray knows about one of our actors: its id, and the GCS's view of its state.

The one place that reaches into Ray's private parts, and why: Ray 2.60's public state API
(`ray.util.state.get_actor`) asks the dashboard's HTTP server, which a cluster may run without
(`include_dashboard=False`, `ray start --include-dashboard=false`); `ray._private.state` reads
the GCS actor table behind it, which is always there. A group restart needs the state to know
when Ray has let the old workers go (cluster/group_restart.py). An actor handle has no public
accessor for its id either (inside the actor, `ray.get_runtime_context().get_actor_id()` has it).
"""

from __future__ import annotations


def actor_id(actor) -> str:
    """The actor's id, hex, as logs and the GCS table show it."""
    return actor._actor_id.hex()


def actor_state(actor) -> str:
    """ALIVE, RESTARTING, DEAD, ... ("" when unknown)."""
    from ray._private import state

    return state.actors(actor_id=actor_id(actor)).get("State", "")
