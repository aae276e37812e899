"""What a model runner returns for one step: one sampled token per sequence that asked."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepOutput:
    seq_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float | None, ...]

    @classmethod
    def empty(cls) -> StepOutput:
        return cls((), (), ())

    def sampled(self) -> dict[int, int]:
        return dict(zip(self.seq_ids, self.token_ids, strict=True))

    def logprob_of(self) -> dict[int, float | None]:
        return dict(zip(self.seq_ids, self.logprobs, strict=True))
