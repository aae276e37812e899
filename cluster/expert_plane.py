"""The expert plane's controller: reads a running group's stats, keeps a sliding window of its
expert load and busy time, and rebalances or scales it when the policies say so (issue 16).

One `tick()` every `interval_s` (driven by the engine replica's reporter, or a test): drain every
worker's stats (Ray calls, never one per step), hand them to the stats listeners (metrics), add
them to the window, and, unless a change is already under way, ask the pure policies:
- expert autoscaling (cluster/expert_scaling_policy.py): the pool size to aim for from the
  expert workers' busy fraction, with delays and bounds;
- live rebalancing (cluster/rebalance_policy.py): a placement with less imbalance (max/mean
  tokens per expert worker) for the window's load, with replicas of the hottest experts.
A decision runs as a task of its own (cluster/plane_actions.py) so stats keep flowing while
weights load; its PlaneEvent reaches the group's plane listeners. After any change the window
starts again: load per worker meant something else before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cluster.elastic_config import ElasticConfig
from cluster.expert_scaling_policy import ScalingState, decide_scale
from cluster.listeners import notify
from cluster.load_window import LoadWindow
from cluster.plane_actions import rebalance_to, scale_to
from cluster.plane_event import PlaneEvent
from cluster.ray_await import awaited
from cluster.rebalance_policy import imbalance, propose_rebalance
from workers.group.worker_stats import WorkerStats

log = logging.getLogger(__name__)

BUSY_WINDOW_S = 2.0


class ExpertPlane:
    def __init__(self, group, config: ElasticConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.group = group
        self.config = config or ElasticConfig()
        self.clock = clock
        self.window = LoadWindow(self.config.rebalance.window_s)  # tokens per (layer, expert)
        # Busy time is judged over a short recent span: the scaling delays already ask that it
        # stays high (or low) for a while, and a long window would lag behind the load.
        self.busy_window = LoadWindow(max(2 * self.config.autoscaling.interval_s, BUSY_WINDOW_S))
        self.initial_workers = group.num_expert_workers
        self.stats_listeners: list[Callable[[list[WorkerStats]], None]] = []
        self.scaling = ScalingState()
        self.action: asyncio.Task | None = None  # the change under way
        self._last_poll: float | None = None
        self._shape = self._current_shape()
        self._last_decision = {"rebalance": float("-inf"), "autoscaling": float("-inf")}
        self._last_rebalance = float("-inf")

    def _current_shape(self) -> tuple[int, int]:
        return self.group.placement_version, self.group.num_expert_workers

    @property
    def busy(self) -> bool:
        return (self.action is not None and not self.action.done()) or self.group.reshaping or \
            bool(self.group.background)

    def imbalance(self) -> float:
        """Max / mean tokens per expert worker over the window, under the placement in force."""
        return imbalance(self.group.placement, self.window.load())

    async def tick(self) -> asyncio.Task | None:
        """Read stats; start a change when one is due. Returns the change's task, if one started."""
        stats = await self.poll()
        if stats is None or self.busy:
            return None
        now = self.clock()
        decision = self._decide(now)
        if decision is None:
            return None
        self.action = asyncio.ensure_future(decision)
        return self.action

    async def poll(self) -> list[WorkerStats] | None:
        """Drain every worker's counters into the window and the stats listeners; None when a
        worker did not answer (a fault: the recovery reports it)."""
        group = self.group
        try:
            stats = list(await asyncio.gather(*[awaited(w.dispatch_stats.remote()) for w in group.workers]))
        except Exception as exc:
            log.debug("could not read worker stats: %s", type(exc).__name__)
            return None
        now = self.clock()
        wall = 0.0 if self._last_poll is None else now - self._last_poll
        self._last_poll = now
        notify(self.stats_listeners, stats, "worker-stats")
        if self._current_shape() != self._shape:  # load per worker index meant something else
            self._shape = self._current_shape()
            self.window.clear()
            self.busy_window.clear()
            return stats
        first_expert = group.num_attention_workers
        tokens: dict[tuple[int, int], int] = {}
        busy: dict[int, float] = {}
        for ws in stats:
            if ws.kind != "expert":
                continue
            busy[ws.rank - first_expert] = ws.busy_seconds
            for key, n in ws.dispatch.tokens_per_expert.items():
                tokens[key] = tokens.get(key, 0) + n
        if wall > 0:
            self.window.add(now, tokens, busy, wall)
            self.busy_window.add(now, {}, busy, wall)
        group.recent_load = self.window.load() or None
        return stats

    def _decide(self, now: float):
        """The change to make now, as a coroutine, or None."""
        auto, rebalance = self.config.autoscaling, self.config.rebalance
        group = self.group
        if auto.enabled and now - self._last_decision["autoscaling"] >= auto.interval_s:
            self._last_decision["autoscaling"] = now
            decision = decide_scale(auto, self.scaling, now, self.busy_window.busiest_fraction(),
                                    group.num_expert_workers, self.initial_workers)
            self.scaling = decision.state
            if decision.target != group.num_expert_workers:
                group.target_expert_workers = decision.target
                return self._after(scale_to(group, decision.target, load=self.window.load() or None,
                                            reason=decision.reason))
        if (rebalance.enabled and now - self._last_decision["rebalance"] >= rebalance.interval_s
                and now - self._last_rebalance >= rebalance.cooldown_s):
            self._last_decision["rebalance"] = now
            proposal = propose_rebalance(group.placement, self.window.load(), rebalance)
            if proposal is not None:
                self._last_rebalance = now
                return self._after(rebalance_to(group, proposal.placement,
                                                imbalance_before=proposal.imbalance_before,
                                                imbalance_after=proposal.imbalance_after))
        return None

    async def _after(self, change) -> PlaneEvent | None:
        event = await change
        self.window.clear()
        self.busy_window.clear()
        self.scaling = ScalingState()
        self._shape = self._current_shape()
        return event

    async def run(self, interval_s: float) -> None:
        """Tick every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:
                log.exception("expert plane tick failed")

    async def stop(self) -> None:
        if self.action is not None and not self.action.done():
            self.action.cancel()

