"""Continuous batching with chunked prefill and preemption by recompute.

Every step spends a budget of `max_num_batched_tokens` tokens, in this order:

1. decode: one token for each running sequence that has finished its prefill, oldest
   first (decodes are cheap and keep inter-token latency flat);
2. prefill chunks for running sequences whose prefill is not done yet;
3. prefill chunks for waiting sequences, strictly in FIFO order: the head of the queue
   starts only if its chunk gets blocks, and nobody behind it may skip ahead.

A chunk is min(uncomputed tokens, budget left). When a running sequence cannot get a
block to make progress, the newest running sequence is preempted: its blocks are freed,
`num_computed_tokens` goes back to 0, and it returns to the front of the waiting queue
with its outputs kept, to be prefilled again later. If the sequence needing room is
itself the newest, it is the one preempted. A step that preempted admits nobody new.

Progress is guaranteed: add() only accepts sequences whose prompt + max_tokens fit in the
whole cache, the oldest running sequence may preempt every other one, and the budget is
at least max_num_seqs, so each running sequence decodes every step.
"""

from __future__ import annotations

from collections import deque

from cluster.block_manager import BlockManager
from cluster.scheduler_config import SchedulerConfig
from cluster.sequence import FinishReason, Sequence, SequenceStatus
from workers.model.batch_spec import ScheduledBatch, ScheduledSeq


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if block_manager.block_size != config.block_size:
            raise ValueError(
                f"block_size: block manager has {block_manager.block_size}, config has {config.block_size}"
            )
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is the newest
        self._seqs: dict[int, Sequence] = {}  # every sequence not finished, by id
        self.num_preemptions = 0
        self.last_num_batched_tokens = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"sequence {seq.seq_id} is not a fresh waiting sequence")
        max_len = seq.num_prompt_tokens + seq.sampling.max_tokens
        if max_len > self.config.max_model_len:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.sampling.max_tokens}) "
                f"exceeds the maximum context length of {self.config.max_model_len} tokens"
            )
        if max_len > self.block_manager.num_slots:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.sampling.max_tokens}) "
                f"exceeds the KV cache of {self.block_manager.num_slots} tokens"
            )
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        """Drops a sequence wherever it is and frees its blocks at once; None if unknown."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if self._seqs.get(seq.seq_id) is not seq:
            return  # already finished or aborted
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        del self._seqs[seq.seq_id]
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> ScheduledBatch | None:
        budget = self.config.max_num_batched_tokens
        chosen: dict[int, ScheduledSeq] = {}
        num_preempted = 0

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.is_prefill:
                continue
            fits, preempted = self._make_room(seq, chosen)
            num_preempted += preempted
            if fits:
                chosen[seq.seq_id] = self._take(seq, 1)
                budget -= 1

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.seq_id in chosen:
                continue
            fits, preempted = self._make_room(seq, chosen)
            num_preempted += preempted
            if fits:
                num_new = min(
                    seq.num_uncomputed_tokens, budget, self.block_manager.num_allocatable_tokens(seq)
                )
                chosen[seq.seq_id] = self._take(seq, num_new)
                budget -= num_new

        while not num_preempted and self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chosen[seq.seq_id] = self._take(seq, num_new)
            budget -= num_new

        self.last_num_batched_tokens = self.config.max_num_batched_tokens - budget
        if not chosen:
            if self.has_work:
                raise RuntimeError("scheduler stalled: work is queued but nothing fits the KV cache")
            return None
        return ScheduledBatch(seqs=tuple(chosen.values()), num_preempted=num_preempted)

    def update(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Records a finished step; returns the sequences that got a new token.

        Sequences that stopped running while the step ran (aborted, finished, or requeued
        by requeue_running) are skipped: their slots are free or will be recomputed.
        """
        live = [
            (s, seq)
            for s in batch.seqs
            if (seq := self._seqs.get(s.seq_id)) is not None and seq.status is SequenceStatus.RUNNING
        ]
        for s, seq in live:
            if seq.num_computed_tokens != s.start_pos:
                raise RuntimeError(f"batch is stale for sequence {s.seq_id}")
            if s.needs_sample and s.seq_id not in sampled:
                raise ValueError(f"no sampled token for sequence {s.seq_id}")
        grown = []
        for s, seq in live:
            seq.num_computed_tokens = s.end_pos
            if s.needs_sample:
                seq.output_ids.append(sampled[s.seq_id])
                grown.append(seq)
        return grown

    def requeue_running(self) -> list[Sequence]:
        """The KV cache is lost (a worker died): every running sequence will be prefilled again.

        Not counted as preemptions. Returns the requeued sequences, oldest first.
        """
        requeued = list(self.running)
        for seq in reversed(requeued):
            self._requeue(seq)
        return requeued

    def _make_room(self, seq: Sequence, chosen: dict[int, ScheduledSeq]) -> tuple[bool, int]:
        """Preempts newest-first until seq can compute one more token; (fits, preempted)."""
        num_preempted = 0
        while not self.block_manager.can_allocate(seq, 1):
            # seq itself is never in chosen, so a victim always exists.
            victim = next(s for s in reversed(self.running) if s.seq_id not in chosen)
            self._requeue(victim)
            victim.num_preemptions += 1
            self.num_preemptions += 1
            num_preempted += 1
            if victim is seq:
                return False, num_preempted
        return True, num_preempted

    def _requeue(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _take(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        self.block_manager.allocate(seq, num_new)
        return ScheduledSeq(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.token_ids_between(start, start + num_new)),
            start_pos=start,
            block_table=tuple(seq.block_table),
            needs_sample=start + num_new == seq.num_tokens,
            sampling=seq.sampling,
            output_len=seq.num_output_tokens,
        )
