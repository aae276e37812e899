"""The group's decode-graph decisions, as pure functions and on the loopback: the plan (the same on
every rank, eager off NCCL), each step's bucket, the capture loop's agreement between ranks, and the
statistics replays record."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from cluster.decode_graphs import capture_on_every_worker, group_graph_plan
from cluster.engine_config import EngineConfig
from workers.comm.transport import LocalTransport, Transfer
from workers.group.graph_plan import DecodeGraphPlan, decode_graph_plan, dispatch_tokens, group_step_bucket
from workers.group.replay_stats import ReplayStats
from workers.group.worker_graphs import AttentionGraphs, ExpertGraphs, all_agree, capture_buckets, capture_for
from workers.model.attention_metadata import SeqExtent
from workers.model.cuda_graph_budget import CaptureBudget
from workers.model.static_capture import EagerCapture

ROOMY = CaptureBudget()


def plan(**kw):
    args = dict(backend="nccl", enforce_eager=False, max_num_seqs=64, low_latency_max_tokens=64) | kw
    return decode_graph_plan(**args)


def test_nccl_groups_capture_the_low_latency_decode_sizes():
    assert plan().buckets == (1, 2, 4, 8, 16, 32, 64)
    assert plan(low_latency_max_tokens=24).buckets == (1, 2, 4, 8, 16, 24)  # only low-latency steps replay
    assert plan(max_num_seqs=12).buckets == (1, 2, 4, 8, 12)
    assert plan(max_num_seqs=1000, low_latency_max_tokens=1000).buckets[-1] == 256
    assert plan() == plan()  # a value every rank gets alike


@pytest.mark.parametrize(("kw", "why"), [
    (dict(backend="gloo"), "gloo backend"),
    (dict(backend="staged"), "staged backend"),
    (dict(enforce_eager=True), "enforce_eager"),
    (dict(low_latency_max_tokens=0), "low-latency dispatch is off"),
])
def test_otherwise_every_step_is_eager(kw, why):
    p = plan(**kw)
    assert not p.enabled and p.buckets == () and why in p.why_eager


def test_a_plan_is_ascending_and_distinct():
    with pytest.raises(ValueError):
        DecodeGraphPlan(buckets=(4, 2))
    with pytest.raises(ValueError):
        DecodeGraphPlan(buckets=(0, 1))


def test_each_step_runs_in_the_bucket_of_its_low_latency_tokens():
    captured = (8, 16, 32)  # a budget skipped the smaller ones: small steps pad up to 8
    assert group_step_bucket(None, captured) is None  # exact steps never replay
    assert [group_step_bucket(t, captured) for t in (1, 8, 9, 32, 33)] == [8, 8, 16, 32, None]
    # Buffers are sized for the bucket, so a rank that cannot replay still meets those that do.
    assert [dispatch_tokens(t, captured) for t in (None, 3, 9, 33)] == [None, 8, 16, 33]
    assert dispatch_tokens(5, ()) == 5


def test_capture_for_takes_cuda_graphs_only_over_nccl():
    cpu = LocalTransport()
    assert isinstance(capture_for(cpu, DecodeGraphPlan(buckets=(1,))), EagerCapture)
    gloo_on_a_gpu = LocalTransport("cuda")  # never touches the device here
    gloo_on_a_gpu.backend = "gloo"
    with pytest.raises(ValueError, match="cannot be captured"):
        capture_for(gloo_on_a_gpu, DecodeGraphPlan(buckets=(1,)))


class _Peer(LocalTransport):
    """A loopback that reports a second rank voting `votes` in turn (its last one from then on)."""

    def __init__(self, *votes: int) -> None:
        super().__init__()
        self.world_size, self.votes = 2, list(votes)

    def exchange_counts(self, counts_WC):
        vote = self.votes.pop(0) if len(self.votes) > 1 else self.votes[0]
        return torch.tensor([[int(counts_WC[0, 0])], [vote]])


def steps_recorded():
    ran = []

    def step_of(bucket):
        def step():
            ran.append(bucket)
            return bucket
        return step
    return ran, step_of


def test_capture_largest_first_with_a_warm_up_each():
    ran, step_of = steps_recorded()
    steps = capture_buckets(DecodeGraphPlan(buckets=(1, 2, 4)), step_of, EagerCapture(), LocalTransport(),
                            ROOMY, "test")
    assert ran == [4, 2, 1] and sorted(steps) == [1, 2, 4] and steps[2]() == 2


def test_a_spent_budget_anywhere_stops_every_rank_after_the_largest():
    spent = CaptureBudget(max_seconds=1e-9)
    ran, step_of = steps_recorded()
    steps = capture_buckets(DecodeGraphPlan(buckets=(1, 2, 4)), step_of, EagerCapture(), LocalTransport(),
                            spent, "test")
    assert sorted(steps) == [4] and ran == [4]
    ran, step_of = steps_recorded()  # this rank has budget; its peer can capture, then runs out
    steps = capture_buckets(DecodeGraphPlan(buckets=(1, 2, 4)), step_of, EagerCapture(), _Peer(1, 0),
                            ROOMY, "test")
    assert sorted(steps) == [4] and ran == [4]  # the peer's "no" stops this rank too
    assert all_agree(_Peer(1), True) and not all_agree(_Peer(1), False) and not all_agree(_Peer(0), True)


def test_a_rank_that_cannot_capture_leaves_every_rank_eager():
    """NCCL wants a collective captured on all its ranks or none."""
    ran, step_of = steps_recorded()
    assert capture_buckets(DecodeGraphPlan(buckets=(1, 2)), step_of, None, LocalTransport(), ROOMY, "t") == {}
    assert capture_buckets(DecodeGraphPlan(buckets=(1, 2)), step_of, EagerCapture(), _Peer(0), ROOMY,
                           "t") == {}
    assert ran == []


def test_replays_record_their_counts_and_traffic():
    stats = ReplayStats([(0, 3), (5,)], torch.device("cpu"))
    moved = Transfer(bytes_sent=100, bytes_received=60, seconds=1.0)
    counts = [torch.tensor([2, 1]), torch.tensor([4])]

    def step():  # what a graph of one bucket records: each layer's dispatch and combine
        with stats.recording(8):
            for layer, ids in enumerate(stats.local_expert_ids):
                stats.record_dispatch_on_device(layer, ids, counts[layer], moved, 0.5)
                stats.record_combine(moved, 0.5)

    step()  # the capture's warm-up
    stats.discard()
    for _ in range(3):  # three replays: the graph adds the counts, the host counts the replays
        step()
        stats.record_replay(8)
    snap = stats.snapshot_and_reset()
    assert snap.tokens_per_expert == {(0, 0): 6, (0, 3): 3, (1, 5): 12}
    assert snap.num_dispatches == 3 * 2
    assert (snap.dispatch_bytes_sent, snap.combine_bytes_received) == (3 * 2 * 100, 3 * 2 * 60)
    assert snap.dispatch_seconds == 0.0  # a replay's time is not split by stage
    assert stats.snapshot_and_reset().tokens_per_expert == {}


def test_every_rank_replays_a_bucketed_step_even_one_with_no_sequence():
    shape = SimpleNamespace(max_context_len=16)
    attention = AttentionGraphs((4, 8), runner=SimpleNamespace(inputs=SimpleNamespace(shape=shape)))
    experts = ExpertGraphs({4: lambda: 40, 8: lambda: 80})
    assert attention.begin_step(3) == experts.begin_step(3) == 4  # buffers for the bucket
    assert attention.step_bucket([SeqExtent(5, 1, (0, 1))]) == 4
    assert attention.step_bucket([]) == 4  # padding only: its all-to-alls are in the graph too
    assert experts.replay() == 40
    with pytest.raises(RuntimeError, match="does not fit"):  # never eager while the others replay
        attention.step_bucket([SeqExtent(20, 1, tuple(range(6)))])
    assert attention.begin_step(9) == experts.begin_step(9) == 9  # past every bucket: all eager
    assert attention.step_bucket([SeqExtent(5, 1, (0, 1))]) is None and experts.replay() is None
    assert attention.begin_step(None) is None and experts.begin_step(None) is None


class _Actor:
    """A worker handle whose capture answers `buckets` (Ray's `.remote` gives an awaitable)."""

    def __init__(self, buckets) -> None:
        self.plans = []

        async def capture(plan):
            self.plans.append(plan)
            return buckets
        self.capture_decode_graphs = SimpleNamespace(remote=capture)


def test_the_executor_plans_from_the_engine_config_and_captures_on_every_worker():
    config = EngineConfig(max_num_seqs=16, low_latency_max_tokens=8)
    assert group_graph_plan(config, "nccl").buckets == (1, 2, 4, 8)
    assert not group_graph_plan(config, "gloo").enabled
    assert not group_graph_plan(EngineConfig(enforce_eager=True), "nccl").enabled
    workers = [_Actor((1, 2, 4, 8)) for _ in range(3)]
    plan = group_graph_plan(config, "nccl")
    assert asyncio.run(capture_on_every_worker(workers, plan)) == (1, 2, 4, 8)
    assert all(w.plans == [plan] for w in workers)
    with pytest.raises(RuntimeError, match="different"):
        asyncio.run(capture_on_every_worker([_Actor((1, 2)), _Actor((2,))], plan))
    idle = _Actor(())
    assert asyncio.run(capture_on_every_worker([idle], group_graph_plan(config, "gloo"))) == ()
    assert idle.plans == []  # nothing asked of the workers
