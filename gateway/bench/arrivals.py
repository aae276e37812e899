"""When each request is sent: offsets from the start of a run, as pure functions of a seed.

Inter-arrival times are gamma distributed with shape `burstiness` and mean 1 / rate: shape 1
is the exponential (a Poisson process, as independent users make); a smaller shape keeps the
mean rate but bunches requests into bursts, a larger one spaces them evenly. An infinite rate
sends everything at once, and `max_concurrency` (applied by the runner) then turns the run into
a fixed-concurrency test.
"""

from __future__ import annotations

import math
import random


def inter_arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0,
                        seed: int = 0) -> list[float]:
    """Seconds between consecutive requests; the first is also drawn (a run does not start with
    a request at exactly 0 unless the rate is infinite)."""
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0 or not burstiness > 0:
        raise ValueError(f"request_rate and burstiness must be > 0, got {request_rate}, {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    # Gamma(shape k, scale θ) has mean kθ: θ = 1 / (rate · k) keeps the mean at 1 / rate.
    scale = 1.0 / (request_rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(num_requests)]


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float = 1.0,
                    seed: int = 0) -> list[float]:
    """Send time of each request, in seconds from the start of the run (non-decreasing)."""
    offsets, t = [], 0.0
    for gap in inter_arrival_times(num_requests, request_rate, burstiness, seed):
        t += gap
        offsets.append(t)
    return offsets
