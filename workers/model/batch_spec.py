"""What the scheduler asks the model runner to compute in one step.

Frozen messages that cross from the engine to the attention workers (the step channel, or Ray actor calls),
so they hold only builtins and `SamplingParams`. They live in workers/ because the model
runner reads them and workers/ never imports cluster/.

For each sequence the runner computes KV for `token_ids` at positions `start_pos ..
start_pos + len(token_ids) - 1`, writing them into the slots named by `block_table`, and
attends over positions `0 .. start_pos + len(token_ids) - 1`. If `needs_sample`, it then
samples one token from the logits of the last position.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.model.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledSeq:
    seq_id: int
    token_ids: tuple[int, ...]  # the tokens whose KV this step computes
    start_pos: int  # position of token_ids[0]; the sequence's num_computed_tokens before the step
    block_table: tuple[int, ...]  # covers at least start_pos + len(token_ids) positions
    needs_sample: bool  # the step reaches the sequence's last token: a decode, or a prefill's last chunk
    sampling: SamplingParams
    output_len: (
        int  # output tokens so far; a seeded request's RNG offset, so the same seed gives the same text
    )

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"sequence {self.seq_id} is scheduled with no tokens")
        if self.start_pos < 0 or self.output_len < 0:
            raise ValueError(f"sequence {self.seq_id}: start_pos and output_len must be >= 0")

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        """One past the last position computed this step."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class ScheduledBatch:
    seqs: tuple[ScheduledSeq, ...]
    num_preempted: int = 0  # sequences preempted while building this step
    # How the step's MoE layers dispatch in a model group: None, the exact path; a number, the
    # low-latency path with buffers for that many tokens per attention worker (the same number
    # in every worker's batch, and given to the expert workers: workers/moe/low_latency_dispatch.py).
    low_latency_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)
