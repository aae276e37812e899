"""The message the ingress sends the engine deployment (DESIGN.md §1, step 2 → 3).

The engine deployment answers with a stream of `cluster.request_output.RequestOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.model.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float  # time.time() at the ingress: queue time is measured from here
    timeout_s: float | None = None  # deadline, counted from arrival_time; None: none (gateway/deadline.py)
