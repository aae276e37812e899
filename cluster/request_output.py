"""What the engine streams to a waiting request (DESIGN.md §1 step 6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    token_ids: tuple[int, ...]  # new tokens since the previous output
    text: str  # new text since the previous output (empty without a tokenizer)
    logprobs: tuple[float | None, ...]
    num_prompt_tokens: int
    num_output_tokens: int  # all output tokens so far
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    scheduled_time: float | None = None  # time.time() when the engine first scheduled the request

