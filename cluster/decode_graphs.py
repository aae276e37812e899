"""The group's decode CUDA graphs from the executor's side: the plan, and the one call that captures.

Every worker of a group captures at the same point, with the same plan (workers/group/graph_plan.py,
workers/group/worker_graphs.py): after the group forms, and again after every re-form (a restarted
worker, a resized pool: a graph holds the process group it was captured with) and after a placement
switch (a worker drops its graphs when its dispatcher or experts change). No step may run while they
capture: call it before the step loops start, or between two steps. A worker that has no graphs
runs its steps eagerly, and so does every other (each drops them on the same re-form or switch).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from cluster.engine_config import EngineConfig
from cluster.ray_await import awaited
from workers.group.graph_plan import DecodeGraphPlan, decode_graph_plan

log = logging.getLogger(__name__)


def group_graph_plan(engine_cfg: EngineConfig, backend: str) -> DecodeGraphPlan:
    """What the group's workers capture: `backend` is the process group's, `engine_cfg` the engine's
    final config (after a capacity factor turned low-latency dispatch off)."""
    return decode_graph_plan(backend=backend, enforce_eager=engine_cfg.enforce_eager,
                             max_num_seqs=engine_cfg.max_num_seqs,
                             low_latency_max_tokens=engine_cfg.low_latency_max_tokens)


async def capture_on_every_worker(workers: Sequence, plan: DecodeGraphPlan) -> tuple[int, ...]:
    """`capture_decode_graphs(plan)` on every worker (Ray actor handles) at once; the batch sizes
    captured, the same on every rank. Nothing to do for a plan without buckets."""
    if not plan.enabled:
        log.info("model group: decode steps run eagerly (%s)", plan.why_eager)
        return ()
    captured = await asyncio.gather(*[awaited(w.capture_decode_graphs.remote(plan)) for w in workers])
    if len({tuple(c) for c in captured}) != 1:
        raise RuntimeError(f"the group's workers captured different decode graphs: {captured}")
    log.info("model group: decode CUDA graphs for batch sizes %s on %d workers", captured[0], len(workers))
    return tuple(captured[0])


class GroupGraphs:
    """When a Ray executor's workers capture: once the engine's final config is known
    (`configure`), after every forming of the group, and after the step that switched to a new
    placement (`stale`: its workers dropped their graphs when they switched)."""

    def __init__(self) -> None:
        self.engine_cfg: EngineConfig | None = None
        self.stale = False
        self.buckets: tuple[int, ...] = ()

    def configure(self, engine_cfg: EngineConfig) -> None:
        self.engine_cfg = engine_cfg
        self.stale = True

    async def capture(self, workers: Sequence, backend: str) -> tuple[int, ...]:
        """With no step in flight: every worker captures (or, where the plan says eager, nothing)."""
        self.stale = False
        if self.engine_cfg is None:
            return ()
        self.buckets = await capture_on_every_worker(workers, group_graph_plan(self.engine_cfg, backend))
        return self.buckets
