"""One request inside the engine: its token ids and how far its KV cache has got.

Mutable and engine-internal; it never crosses an actor boundary (the model runner sees a
`ScheduledSeq` instead). The one number that drives scheduling is `num_computed_tokens`:
how many leading tokens of `all_token_ids` already have their KV in the cache. Everything
after it must still be computed, in one go (decode) or in chunks (prefill).

Preemption by recompute sets `num_computed_tokens` back to 0 and keeps `output_ids`: the
sequence then prefills prompt + outputs again and samples where it left off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from workers.model.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(StrEnum):
    """The values of OpenAI's `finish_reason` (plus ours: abort and error)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)  # identity, not value: two requests with equal fields are different sequences
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt_ids = list(self.prompt_ids)
        if not self.prompt_ids:
            raise ValueError(f"prompt_ids of sequence {self.seq_id} is empty")

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True until the prompt is computed and only the last sampled token lacks KV.

        A decoding sequence has exactly one uncomputed token (the one it just sampled); a
        one-token prompt also has one, but it is still a prefill because no token of the
        prompt is in the cache yet.
        """
        return self.num_uncomputed_tokens > 1 or self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without copying the whole prompt."""
        num_prompt = len(self.prompt_ids)
        if end <= num_prompt:
            return self.prompt_ids[start:end]
        if start >= num_prompt:
            return self.output_ids[start - num_prompt : end - num_prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - num_prompt]
