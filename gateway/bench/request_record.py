"""What a client reports about one request: the message from the clients to the metrics."""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    ok: bool
    start_s: float  # when it was sent, seconds from the start of the run
    latency_s: float  # sent → last byte (end-to-end latency, E2EL)
    chunk_times_s: tuple[float, ...] = ()  # sent → each streamed message that carried tokens
    prompt_tokens: int = 0  # as the server counted them (usage)
    output_tokens: int = 0
    error: str = ""

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive streamed messages (inter-token latency, as vLLM measures it)."""
        t = self.chunk_times_s
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a one-token answer."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float:
        return self.start_s + self.latency_s


def failed(start_s: float, latency_s: float, error: str) -> RequestRecord:
    return RequestRecord(ok=False, start_s=start_s, latency_s=latency_s, error=error)
