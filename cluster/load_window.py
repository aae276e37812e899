"""A sliding window over the expert workers' stats: what the elastic-plane policies read.

The expert plane polls the workers every few seconds and adds one observation per poll:
tokens per (layer, expert) since the last poll (already summed over the workers), busy
seconds per expert worker over that interval, and the interval's length. The window keeps
the observations of the last `window_s` seconds, so a burst long past stops weighing on
the decisions. Plain Python: no Ray, no torch.

After a placement change the caller clears the window: busy time is kept per worker index,
and worker w holds other experts (or no longer exists) once the placement has changed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

LayerExpert = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class _Observation:
    time: float  # when the interval ended (the caller's monotonic clock)
    tokens: dict[LayerExpert, int]
    busy_seconds: dict[int, float]  # expert worker index → seconds spent running experts
    wall_seconds: float


class LoadWindow:
    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._observations: deque[_Observation] = deque()

    def add(self, now: float, tokens: Mapping[LayerExpert, int], busy_seconds: Mapping[int, float],
            wall_seconds: float) -> None:
        """Record one interval that ended at `now`, then forget those that ended before now - window_s."""
        if self._observations and now < self._observations[-1].time:
            raise ValueError(f"observation at {now} is older than the last one "
                             f"({self._observations[-1].time}); times must not go back")
        if not math.isfinite(wall_seconds) or wall_seconds < 0:
            raise ValueError(f"wall_seconds must be finite and >= 0, got {wall_seconds!r}")
        for key, n in tokens.items():
            if n < 0:
                raise ValueError(f"tokens[{key}] = {n}: must be >= 0")
        for w, s in busy_seconds.items():
            if not math.isfinite(s) or s < 0:
                raise ValueError(f"busy_seconds[{w}] = {s!r}: must be finite and >= 0")
        self._observations.append(_Observation(now, dict(tokens), dict(busy_seconds), wall_seconds))
        while self._observations[0].time < now - self.window_s:
            self._observations.popleft()

    def load(self) -> dict[LayerExpert, float]:
        """Tokens per (layer, expert) over the window (keys never observed are absent)."""
        out: dict[LayerExpert, float] = {}
        for obs in self._observations:
            for key, n in obs.tokens.items():
                out[key] = out.get(key, 0.0) + n
        return out

    def total_tokens(self) -> int:
        return sum(n for obs in self._observations for n in obs.tokens.values())

    def busy_fraction(self) -> float | None:
        """Mean over the workers seen in the window of busy / wall time; None without data.

        A worker missing from an observation counts as idle over it. Each worker's share is
        capped at 1: busy time measured on the worker can overrun the caller's wall clock a little.
        """
        wall = self.span_s()
        workers = {w for obs in self._observations for w in obs.busy_seconds}
        if wall <= 0 or not workers:
            return None
        busy = {w: sum(obs.busy_seconds.get(w, 0.0) for obs in self._observations) for w in workers}
        return sum(min(1.0, b / wall) for b in busy.values()) / len(workers)

    def busiest_fraction(self) -> float | None:
        """The busiest worker's busy / wall time over the window (capped at 1); None without data.

        It is the mean's busy fraction times the workers' imbalance: the one worker every step
        waits for."""
        wall = self.span_s()
        workers = {w for obs in self._observations for w in obs.busy_seconds}
        if wall <= 0 or not workers:
            return None
        return max(min(1.0, sum(obs.busy_seconds.get(w, 0.0) for obs in self._observations) / wall)
                   for w in workers)

    def span_s(self) -> float:
        """Wall seconds the window's observations cover (reaches window_s once the window has filled)."""
        return sum(obs.wall_seconds for obs in self._observations)

    def clear(self) -> None:
        self._observations.clear()

    def __len__(self) -> int:
        return len(self._observations)
