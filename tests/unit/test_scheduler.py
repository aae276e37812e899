"""The scheduler against a fake model runner that keeps a real (dict) KV cache.

The fake runner writes each computed token into its slot and, when it samples, reads the
whole history back through the block table; the sampled token is a hash of that history.
So a block shared by two sequences, a stale slot after reuse, a gap or overlap between
chunks, or a recompute that forgets an output all change the text, and the tests compare
it with the text each request gets when it runs alone.
"""

from __future__ import annotations

import pytest

from cluster.block_manager import BlockManager
from cluster.scheduler import Scheduler
from cluster.scheduler_config import SchedulerConfig
from cluster.sequence import FinishReason, Sequence, SequenceStatus
from tests.unit.scheduler_helpers import FakeRunner, drain, make_scheduler, make_seq, run_alone, step

# --- sequences -------------------------------------------------------------------------


def test_sequence_prefill_and_decode_states():
    seq = make_seq(0, 3)
    assert seq.is_prefill and seq.num_uncomputed_tokens == 3
    seq.num_computed_tokens = 2
    assert seq.is_prefill  # one token left, but it is a prompt token
    seq.num_computed_tokens = 3
    seq.output_ids.append(9)
    assert not seq.is_prefill and seq.all_token_ids == [*seq.prompt_ids, 9]
    assert seq.last_token_id == 9 and seq.num_tokens == 4
    seq.num_computed_tokens = 0  # preempted: recompute prompt + outputs
    assert seq.is_prefill and seq.num_uncomputed_tokens == 4
    one = make_seq(1, 1)
    assert one.is_prefill and one.num_uncomputed_tokens == 1


def test_token_ids_between_spans_prompt_and_outputs():
    seq = Sequence(0, [1, 2, 3], output_ids=[4, 5])
    for start in range(6):
        for end in range(start, 6):
            assert seq.token_ids_between(start, end) == seq.all_token_ids[start:end]


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        Sequence(0, [])


# --- config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"block_size": 0}, "block_size"),
        ({"max_model_len": -1}, "max_model_len"),
        ({"max_num_seqs": 8, "max_num_batched_tokens": 4}, "max_num_batched_tokens"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{"num_kv_blocks": 8, "max_model_len": 64, **kwargs})


def test_config_derived_lengths():
    config = SchedulerConfig(num_kv_blocks=8, block_size=4, max_model_len=100, max_num_seqs=4)
    assert config.num_kv_slots == 32 and config.max_seq_len == 32


# --- admission ---------------------------------------------------------------------------


def test_add_rejects_what_can_never_run():
    sched = make_scheduler(num_kv_blocks=4, block_size=4, max_model_len=12)
    sched.add(make_seq(0, 8, max_tokens=4))  # exactly max_model_len
    with pytest.raises(ValueError, match="maximum context length"):
        sched.add(make_seq(1, 9, max_tokens=4))
    big = make_scheduler(num_kv_blocks=4, block_size=4, max_model_len=4096)
    with pytest.raises(ValueError, match="KV cache"):
        big.add(make_seq(2, 10, max_tokens=7))
    with pytest.raises(ValueError, match="already"):
        sched.add(make_seq(0, 2))
    assert sched.num_waiting == 1 and big.num_waiting == 0


def test_scheduler_and_block_manager_must_agree_on_block_size():
    config = SchedulerConfig(num_kv_blocks=8, block_size=4, max_model_len=64, max_num_seqs=4)
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(config, BlockManager(8, 8))


def test_empty_scheduler_returns_none():
    sched = make_scheduler()
    assert not sched.has_work and sched.schedule() is None


# --- policy ------------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_contiguously():
    sched = make_scheduler(max_num_batched_tokens=16)
    seq = make_seq(0, 40, max_tokens=3)
    sched.add(seq)
    runner = FakeRunner(4)
    batches = drain(sched, runner)
    spans = [(b.seqs[0].start_pos, b.seqs[0].num_new_tokens, b.seqs[0].needs_sample) for b in batches]
    assert spans == [(0, 16, False), (16, 16, False), (32, 8, True), (40, 1, True), (41, 1, True)]
    assert [b.seqs[0].output_len for b in batches] == [0, 0, 0, 1, 2]
    assert list(sum((b.seqs[0].token_ids for b in batches), ())) == seq.all_token_ids[:-1]
    assert seq.output_ids == run_alone(0, 40, 3) and seq.finish_reason is FinishReason.LENGTH


def test_decode_comes_before_prefill_and_prefill_takes_the_rest():
    sched = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner(4)
    a = make_seq(0, 3, max_tokens=10)
    sched.add(a)
    step(sched, runner)
    sched.add(make_seq(1, 40))
    batch = step(sched, runner)
    assert [(s.seq_id, s.num_new_tokens) for s in batch.seqs] == [(0, 1), (1, 15)]
    assert batch.num_tokens == 16 == sched.last_num_batched_tokens


def test_fifo_a_later_arrival_never_skips_ahead():
    # 8 blocks of 4. x holds 5 blocks; a's first chunk (15 tokens) needs 4 but 3 are free;
    # b would fit in one block, yet must wait behind a.
    sched = make_scheduler(num_kv_blocks=8, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    runner = FakeRunner(4)
    x = make_seq(0, 20, max_tokens=6)
    sched.add(x)
    step(sched, runner)
    a, b = make_seq(1, 16, max_tokens=4), make_seq(2, 2, max_tokens=2)
    sched.add(a)
    sched.add(b)
    started: list[int] = []
    while (batch := step(sched, runner)) is not None:
        started += [s.seq_id for s in batch.seqs if s.start_pos == 0 and s.seq_id not in started]
        assert not (b.status is SequenceStatus.RUNNING and a.status is SequenceStatus.WAITING)
    assert started == [1, 2]
    assert sched.block_manager.num_free_blocks == 8


def test_preemption_picks_the_newest_and_recomputes_it():
    # 6 blocks of 2; three sequences outgrow the cache while decoding.
    sched = make_scheduler(num_kv_blocks=6, block_size=2, max_num_batched_tokens=16, max_num_seqs=4)
    runner = FakeRunner(2)
    seqs = [make_seq(i, 2, max_tokens=8) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    while (batch := step(sched, runner)) is not None and not batch.num_preempted:
        pass
    newest = seqs[2]
    assert batch.num_preempted == 1 and sched.num_preemptions == 1
    assert [s.seq_id for s in batch.seqs] == [0, 1]
    assert newest.status is SequenceStatus.WAITING and sched.waiting[0] is newest
    assert newest.num_computed_tokens == 0 and newest.block_table == [] and newest.num_preemptions == 1
    kept_outputs = list(newest.output_ids)
    assert kept_outputs
    recompute = None
    while (batch := step(sched, runner)) is not None:
        for s in batch.seqs:
            if s.seq_id == 2 and recompute is None:
                recompute = s
    assert recompute.start_pos == 0
    assert list(recompute.token_ids) == newest.prompt_ids + kept_outputs
    assert recompute.needs_sample and recompute.output_len == len(kept_outputs)
    for seq in seqs:
        assert seq.output_ids == run_alone(seq.seq_id, 2, 8)
    assert sched.block_manager.num_free_blocks == 6


def test_newest_sequence_preempts_itself_when_it_alone_needs_a_block():
    # 3 blocks of 4: a (5 prompt) holds 2, b (3 prompt) holds 1. b needs a block first.
    sched = make_scheduler(num_kv_blocks=3, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    runner = FakeRunner(4)
    a, b = make_seq(0, 5, max_tokens=4), make_seq(1, 3, max_tokens=4)
    sched.add(a)
    sched.add(b)
    for _ in range(2):
        step(sched, runner)
    batch = step(sched, runner)
    assert batch.num_preempted == 1 and [s.seq_id for s in batch.seqs] == [0]
    assert b.status is SequenceStatus.WAITING and a.num_preemptions == 0
    drain(sched, runner)
    assert a.output_ids == run_alone(0, 5, 4) and b.output_ids == run_alone(1, 3, 4)
    assert sched.block_manager.num_free_blocks == 3


def test_max_num_seqs_caps_running_sequences():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=32)
    runner = FakeRunner(4)
    for i in range(5):
        sched.add(make_seq(i, 3, max_tokens=3))
    while (batch := step(sched, runner)) is not None:
        assert batch.num_seqs <= 2 and sched.num_running <= 2


def test_abort_frees_blocks_at_once_wherever_the_sequence_is():
    sched = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner(4)
    running, waiting = make_seq(0, 16, max_tokens=8), make_seq(1, 10)
    sched.add(running)
    sched.add(waiting)
    step(sched, runner)
    assert sched.block_manager.num_used_blocks == 4
    assert sched.abort(1) is waiting and waiting.finish_reason is FinishReason.ABORT
    assert sched.abort(0) is running and running.status is SequenceStatus.FINISHED
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_work
    assert sched.abort(0) is None and sched.abort(99) is None


def test_abort_during_a_step_is_skipped_by_update():
    sched = make_scheduler()
    runner = FakeRunner(4)
    a, b = make_seq(0, 3), make_seq(1, 3)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sampled = runner.step(batch)
    sched.abort(0)
    assert sched.update(batch, sampled) == [b]
    assert a.output_ids == [] and sched.block_manager.num_used_blocks == 1


def test_update_requires_a_token_for_each_sampled_sequence():
    sched = make_scheduler()
    sched.add(make_seq(0, 3))
    batch = sched.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        sched.update(batch, {})
    assert sched.get(0).num_computed_tokens == 0  # nothing applied


def test_requeue_running_recomputes_everything_after_a_lost_cache():
    sched = make_scheduler(max_num_batched_tokens=32)
    runner = FakeRunner(4)
    seqs = [make_seq(i, 6, max_tokens=6) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    step(sched, runner)
    step(sched, runner)
    assert sched.requeue_running() == seqs
    assert list(sched.waiting) == seqs and sched.block_manager.num_used_blocks == 0
    assert sched.num_preemptions == 0
    runner.kv.clear()  # the worker died with its cache
    drain(sched, runner)
    for seq in seqs:
        assert seq.output_ids == run_alone(seq.seq_id, 6, 6)



def test_update_skips_sequences_requeued_while_the_step_ran():
    sched = make_scheduler()
    runner = FakeRunner(4)
    seq = make_seq(0, 3)
    sched.add(seq)
    batch = sched.schedule()
    sampled = runner.step(batch)
    sched.requeue_running()
    assert sched.update(batch, sampled) == [] and seq.num_computed_tokens == 0
    drain(sched, runner)
    assert seq.output_ids == run_alone(0, 3, 4)
