"""Random workloads against the scheduler and the fake runner: budgets respected, no block leaked,
and every request's text equal to the text it gets alone (scheduler_helpers.py explains why that
catches shared, stale or skipped KV slots)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.scheduler import Scheduler
from cluster.sequence import Sequence
from tests.unit.scheduler_helpers import FakeRunner, make_scheduler, make_seq, run_alone, stops
from workers.model.batch_spec import ScheduledBatch


def check_invariants(sched: Scheduler, batch: ScheduledBatch, before: dict[int, int]) -> None:
    config, bm = sched.config, sched.block_manager
    assert batch.num_tokens <= config.max_num_batched_tokens
    assert batch.num_seqs <= config.max_num_seqs and sched.num_running <= config.max_num_seqs
    assert len({s.seq_id for s in batch.seqs}) == batch.num_seqs
    for s in batch.seqs:
        seq = sched.get(s.seq_id)
        if seq is None:
            continue  # aborted while in flight
        assert s.start_pos == before[s.seq_id]
        assert s.needs_sample == (s.end_pos == seq.num_tokens)
        assert list(s.token_ids) == seq.all_token_ids[s.start_pos : s.end_pos]
    live = sched.running + list(sched.waiting)
    owned = [b for seq in live for b in seq.block_table]
    assert len(owned) == len(set(owned)) == bm.num_used_blocks
    assert all(not seq.block_table for seq in sched.waiting)


STOP_IDS = (0, 1)  # the fake model emits each with probability 1/50


def simulate(seed: int, num_kv_blocks: int, block_size: int, max_num_seqs: int, budget: int) -> bool:
    rng = random.Random(seed)
    sched = make_scheduler(num_kv_blocks, block_size, max_num_seqs, budget)
    runner = FakeRunner(block_size)
    capacity = num_kv_blocks * block_size
    arrivals = []
    for seq_id in range(rng.randint(1, 25)):
        max_tokens = rng.randint(1, min(12, capacity - 1))
        num_prompt = rng.randint(1, min(40, capacity - max_tokens))
        arrivals.append((rng.randint(0, 30), seq_id, num_prompt, max_tokens))
    arrivals.sort()
    seqs: dict[int, Sequence] = {}
    aborted: set[int] = set()
    preempted_any = False
    for tick in range(10_000):
        while arrivals and arrivals[0][0] <= tick:
            _, seq_id, num_prompt, max_tokens = arrivals.pop(0)
            seqs[seq_id] = make_seq(seq_id, num_prompt, max_tokens, STOP_IDS)
            sched.add(seqs[seq_id])
        if rng.random() < 0.05 and seqs:
            victim = rng.choice(list(seqs))
            if sched.abort(victim) is not None:
                aborted.add(victim)
        before = {s.seq_id: s.num_computed_tokens for s in sched.running + list(sched.waiting)}
        batch = sched.schedule()
        if batch is None:
            assert not sched.has_work
            if not arrivals:
                break
            continue
        preempted_any |= batch.num_preempted > 0
        sampled = runner.step(batch)
        if rng.random() < 0.05:  # a client disconnects while its step runs
            victim = rng.choice(batch.seqs).seq_id
            if sched.abort(victim) is not None:
                aborted.add(victim)
        check_invariants(sched, batch, before)
        for seq in sched.update(batch, sampled):
            if (reason := stops(seq)) is not None:
                sched.finish(seq, reason)
    else:
        raise AssertionError("workload did not finish")
    assert not sched.has_work and sched.block_manager.num_free_blocks == num_kv_blocks
    for seq_id, seq in seqs.items():
        assert seq.is_finished
        if seq_id not in aborted:
            assert seq.output_ids == run_alone(
                seq_id, seq.num_prompt_tokens, seq.sampling.max_tokens, STOP_IDS
            )
    return preempted_any


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_kv_blocks=st.integers(4, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    max_num_seqs=st.integers(1, 8),
    extra_budget=st.integers(0, 40),
)
def test_random_workload_respects_budgets_leaks_nothing_and_keeps_the_text(
    seed, num_kv_blocks, block_size, max_num_seqs, extra_budget
):
    if num_kv_blocks * block_size < 4:
        return
    simulate(seed, num_kv_blocks, block_size, max_num_seqs, max_num_seqs + extra_budget)


def test_seeded_workloads_exercise_preemption():
    preempted = [simulate(seed, 6, 4, 6, 16) for seed in range(40)]
    assert sum(preempted) >= 5
