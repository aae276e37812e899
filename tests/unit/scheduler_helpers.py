"""A fake model runner with a real (dict) KV cache, and scheduler/sequence builders, for the
scheduler tests (test_scheduler.py, test_scheduler_workloads.py)."""

from __future__ import annotations

from cluster.block_manager import BlockManager
from cluster.scheduler import Scheduler
from cluster.scheduler_config import SchedulerConfig
from cluster.sequence import FinishReason, Sequence
from workers.model.batch_spec import ScheduledBatch
from workers.model.sampling_params import SamplingParams


def make_scheduler(
    num_kv_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 4,
    max_num_batched_tokens: int = 16,
    max_model_len: int = 4096,
) -> Scheduler:
    config = SchedulerConfig(
        num_kv_blocks=num_kv_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
    )
    return Scheduler(config, BlockManager(config.num_kv_blocks, config.block_size))


def make_seq(
    seq_id: int, num_prompt: int, max_tokens: int = 4, stop_token_ids: tuple[int, ...] = ()
) -> Sequence:
    prompt = [(seq_id * 7919 + i * 104729) % 1000 + 1 for i in range(num_prompt)]
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=stop_token_ids)
    return Sequence(seq_id, prompt, sampling)


class FakeRunner:
    """Writes KV into a slot → (seq_id, position, token) dict; samples from what it reads back."""

    def __init__(self, block_size: int, stop_token: int | None = None) -> None:
        self.block_size = block_size
        self.stop_token = stop_token
        self.kv: dict[int, tuple[int, int, int]] = {}

    def slot(self, block_table: tuple[int, ...], pos: int) -> int:
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def step(self, batch: ScheduledBatch) -> dict[int, int]:
        sampled = {}
        for s in batch.seqs:
            assert len(s.block_table) * self.block_size >= s.end_pos
            for i, token in enumerate(s.token_ids):
                self.kv[self.slot(s.block_table, s.start_pos + i)] = (s.seq_id, s.start_pos + i, token)
            if s.needs_sample:
                history = []
                for pos in range(s.end_pos):
                    seq_id, kv_pos, token = self.kv[self.slot(s.block_table, pos)]
                    assert (seq_id, kv_pos) == (s.seq_id, pos), "slot holds another sequence's KV"
                    history.append(token)
                sampled[s.seq_id] = next_token(history, s.output_len)
        return sampled


def next_token(history: list[int], output_len: int) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(history)) * 31 + output_len) % 997 % 50


def stops(seq: Sequence) -> FinishReason | None:
    if seq.output_ids[-1] in seq.sampling.stop_token_ids:
        return FinishReason.STOP
    if seq.num_output_tokens >= seq.sampling.max_tokens:
        return FinishReason.LENGTH
    return None


def step(sched: Scheduler, runner: FakeRunner) -> ScheduledBatch | None:
    """One engine iteration: schedule, run, update, finish the stopped."""
    batch = sched.schedule()
    if batch is None:
        return None
    for seq in sched.update(batch, runner.step(batch)):
        if (reason := stops(seq)) is not None:
            sched.finish(seq, reason)
    return batch


def run_alone(
    seq_id: int, num_prompt: int, max_tokens: int, stop_token_ids: tuple[int, ...] = ()
) -> list[int]:
    sched = make_scheduler(num_kv_blocks=1024, max_num_batched_tokens=64)
    seq = make_seq(seq_id, num_prompt, max_tokens, stop_token_ids)
    sched.add(seq)
    runner = FakeRunner(4)
    while step(sched, runner):
        pass
    return seq.output_ids


def drain(sched: Scheduler, runner: FakeRunner) -> list[ScheduledBatch]:
    batches = []
    while (batch := step(sched, runner)) is not None:
        batches.append(batch)
    return batches
