"""A model group in processes of its own (no Ray), driven by the real engine, with and without the
group's decode graphs (workers/group/worker_graphs.py).

Rank 0 is an AttentionWorker and runs the Engine through a small executor; the other ranks (more
attention workers, then the ExpertWorkers) take their part of each step (a batch, or the step's
`low_latency_tokens`) and capture / restart / stats orders from a queue, as their step loops
would from the step channel. With two attention workers, one of them at times has no sequence in
a replayed step (it replays padding only). Rank 0 runs, in order:

  eager        the workload (arrivals every step, too few KV blocks: preemptions), then an abort
               scenario, every step eager;
  capture      every rank captures the plan's buckets together;
  graphs       the same workload and abort scenario, decode steps replayed;
  restart      the workload again, the group re-formed mid-run (the expert workers replaced by new
               ones, the attention worker leaving and joining with its KV cache, as a one-worker
               repair does) and every rank capturing again.

and writes what each phase gave (ids, logprobs, buckets replayed, tokens the expert workers
counted, preemptions) to a JSON file the test compares. On CPUs over gloo the capture is the eager
stand-in (tests/integration/test_group_graphs.py); on GPUs over NCCL, CUDA graphs
(tests/gpu/test_group_graphs_gpu.py).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing.forkserver
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class GroupCase:
    model_dir: str
    out_path: str
    num_attention_workers: int = 1
    num_expert_workers: int = 2
    device: str = "cpu"  # every rank's; "cuda": rank r sees only GPU r
    backend: str = "gloo"
    dtype: str = "float32"
    buckets: tuple[int, ...] = (1, 2, 4, 8)
    engine: dict = field(default_factory=lambda: dict(
        max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_kv_blocks=24, low_latency_max_tokens=8))
    worker_kv_blocks: int = 256
    num_requests: int = 14
    restart_at_step: int = 12

    @property
    def world_size(self) -> int:
        return self.num_attention_workers + self.num_expert_workers


def run_group(case: GroupCase) -> dict:
    """Start every rank, run the phases, and return rank 0's report."""
    from workers.comm.transport import pick_free_port

    ctx = mp.get_context("forkserver")
    multiprocessing.forkserver.set_forkserver_preload([__name__])
    orders = [ctx.SimpleQueue() for _ in range(case.world_size)]  # [0] unused: rank 0 gives them
    replies = [ctx.SimpleQueue() for _ in range(case.world_size)]
    mp.start_processes(_rank_main, args=(case, pick_free_port(), orders, replies), nprocs=case.world_size,
                       join=True, start_method="forkserver")
    return json.loads(Path(case.out_path).read_text())


def _spec(case: GroupCase):
    from cluster.placement import place_experts
    from workers.group.spec import GroupSpec
    from workers.model.cache_config import CacheConfig
    from workers.weights.config import ModelConfig

    cfg = ModelConfig.from_dir(case.model_dir)
    emap = place_experts(cfg.num_hidden_layers, cfg.num_local_experts,
                         case.num_expert_workers).to_expert_map(first_expert_rank=case.num_attention_workers)
    cache = CacheConfig(block_size=case.engine["block_size"], num_blocks=case.worker_kv_blocks,
                        max_num_seqs=case.engine["max_num_seqs"])
    return GroupSpec(model_dir=case.model_dir, expert_map=emap, cache=cache, device=case.device,
                     num_attention_workers=case.num_attention_workers, dtype=case.dtype,
                     collective_timeout_s=60.0)


def _plan(case: GroupCase):
    from workers.group.graph_plan import DecodeGraphPlan

    return DecodeGraphPlan(buckets=case.buckets)


def _rank_main(rank: int, case: GroupCase, port: int, orders: list, replies: list) -> None:
    if case.device == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # before CUDA starts in this process
    import torch

    torch.set_num_threads(1)
    if case.device == "cuda":  # fp32 comparisons: no TF32 rounding of matmul inputs
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    try:
        if rank == 0:
            _rank0_main(case, port, orders, replies)
        else:
            _follower_main(rank, case, port, orders[rank], replies[rank])
    except BaseException:
        traceback.print_exc()  # the parent reports the first rank to fail; this says why
        raise


def _new_worker(case: GroupCase, rank: int):
    from workers.group.attention_worker import AttentionWorker
    from workers.group.expert_worker import ExpertWorker

    return (AttentionWorker if rank < case.num_attention_workers else ExpertWorker)(_spec(case), rank)


def _follower_main(rank: int, case: GroupCase, port: int, orders, replies) -> None:
    """Ranks past 0: each step's part (an attention worker's batch, or the step's low_latency_tokens
    for an expert worker), and the orders rank 0 gives."""
    worker = _new_worker(case, rank)
    worker.join(LOOPBACK, port, case.backend)
    attention = rank < case.num_attention_workers
    idle_replays = 0
    while True:
        order, arg = orders.get()
        if order == "step" and attention:
            replays = _num_replays(worker)
            replies.put(worker.execute(arg))
            idle_replays += not arg.seqs and _num_replays(worker) > replays
        elif order == "step":
            worker.execute(arg)
        elif order == "idle":
            replies.put(idle_replays)
        elif order == "capture":
            replies.put(worker.capture_decode_graphs(arg))
        elif order == "stats":
            replies.put(sum(worker.dispatch_stats().dispatch.tokens_per_expert.values()))
        elif order == "restart":  # expert workers: a new worker in place of this one; attention
            worker.leave()        # workers: the same one (its KV cache kept), in the new group
            if not attention:
                worker = _new_worker(case, rank)
            worker.join(LOOPBACK, arg, case.backend)
        elif order == "stop":
            worker.leave()
            return


class _Group:
    """The engine's executor: rank 0's AttentionWorker here, the other ranks through their queues."""

    def __init__(self, case: GroupCase, worker, orders: list, replies: list) -> None:
        self.case, self.worker = case, worker
        self.orders, self.replies = orders[1:], replies[1:]
        self.num_attention_workers = case.num_attention_workers
        self.num_steps = 0
        self.restart_at: int | None = None
        self.idle_replays = 0  # low-latency steps rank 0 replayed with no sequence of its own

    def tell(self, order: str, arg=None) -> None:
        for q in self.orders:
            q.put((order, arg))

    def answers(self) -> list:
        return [q.get() for q in self.replies]

    def capture(self) -> list:
        self.tell("capture", _plan(self.case))
        mine = self.worker.capture_decode_graphs(_plan(self.case))
        return [list(mine)] + [list(b) for b in self.answers()]

    def idle(self) -> int:
        """Low-latency steps an attention worker replayed with no sequence of its own, so far."""
        self.tell("idle")
        return self.idle_replays + sum(self.answers())

    def expert_tokens(self) -> int:
        """Rows the expert workers counted since last asked."""
        self.tell("stats")
        self.worker.dispatch_stats()
        return sum(self.answers())

    def restart(self) -> None:
        from workers.comm.transport import pick_free_port

        port = pick_free_port()
        self.tell("restart", port)
        self.worker.leave()
        self.worker.join(LOOPBACK, port, self.case.backend)
        self.capture()

    async def execute(self, batches):
        self.num_steps += 1
        if self.num_steps == self.restart_at:
            self.restart()
        a = self.num_attention_workers
        for rank, q in enumerate(self.orders, start=1):
            q.put(("step", batches[rank] if rank < a else batches[0].low_latency_tokens))
        replays = _num_replays(self.worker)
        mine = self.worker.execute(batches[0])
        self.idle_replays += not batches[0].seqs and _num_replays(self.worker) > replays
        return (mine, *[q.get() for q in self.replies[:a - 1]])

    async def recover(self, fault, timeout_s):
        raise RuntimeError("no recovery in the harness")


def _rank0_main(case: GroupCase, port: int, orders: list, replies: list) -> None:
    worker = _new_worker(case, 0)
    worker.join(LOOPBACK, port, case.backend)
    group = _Group(case, worker, orders, replies)
    report: dict = {}
    try:
        report["eager"] = _phase(case, group)
        report["captured"] = group.capture()
        report["graphs"] = _phase(case, group)
        group.restart_at = group.num_steps + case.restart_at_step
        report["restart"] = _phase(case, group, abort=False)  # replays: those after the restart
        report["restarted"] = group.num_steps >= group.restart_at
    finally:
        group.tell("stop")
        worker.leave()
    Path(case.out_path).write_text(json.dumps(report))


def _phase(case: GroupCase, group: _Group, abort: bool = True) -> dict:
    from cluster.engine import Engine
    from cluster.engine_config import EngineConfig
    from tests.engine_helpers import run_requests

    def engine() -> Engine:
        config = EngineConfig(**case.engine, num_attention_workers=case.num_attention_workers)
        return Engine(group, config, max_model_len=512)

    group.expert_tokens()  # drain what came before
    runner_before, before = _replays(group)
    idle_before = group.idle()
    eng = engine()
    results = run_requests(eng, workload(case.num_requests))
    out = {"ids": [r["token_ids"] for r in results], "logprobs": [r["logprobs"] for r in results],
           "preemptions": eng.stats().num_preemptions, "expert_tokens": group.expert_tokens()}
    runner_after, after = _replays(group)
    if runner_after is not runner_before:  # captured again (a restart): counted from 0
        before = {}
    out["replays"] = {str(b): n - before.get(b, 0) for b, n in after.items()}
    if abort:
        out["abort"] = asyncio.run(_abort_then_another(engine()))
    out["idle_replays"] = group.idle() - idle_before
    return out


def _num_replays(worker) -> int:
    graphs = worker.runner.decode_graphs
    return sum(graphs.runner.runs_per_bucket.values()) if graphs is not None and graphs.runner else 0


def _replays(group: _Group) -> tuple[object, dict[int, int]]:
    """Rank 0's graph runner and the steps it replayed so far, by bucket."""
    graphs = group.worker.runner.decode_graphs
    runner = graphs.runner if graphs is not None else None
    return runner, dict(runner.runs_per_bucket) if runner is not None else {}


def workload(n: int, seed: int = 5) -> list:
    """Two arrivals a step, prompts of 1–30 tokens, 1–20 greedy tokens each (with logprobs): decode
    batches of every size up to max_num_seqs as the first ones finish."""
    import random

    from workers.model.sampling_params import SamplingParams

    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(3, 100) for _ in range(rng.randint(1, 30))]
        params = SamplingParams(max_tokens=rng.randint(1, 20), temperature=0.0, ignore_eos=True,
                                logprobs=True)
        reqs.append((prompt, params, i // 2))
    return reqs


async def _abort_then_another(engine) -> dict:
    """A request aborted after 3 tokens (a client gone), then another: what each got."""
    from tests.engine_helpers import collect
    from workers.model.sampling_params import SamplingParams

    long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    stream = engine.generate("a", list(range(3, 40)), long)
    first: list[int] = []
    async for out in stream:
        first += out.token_ids
        if len(first) >= 3:
            break
    await stream.aclose()
    stats = engine.stats()
    short = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    other = await collect(engine, "b", [5, 6, 7], short)
    await engine.shutdown()
    return {"first": first[:3], "blocks_after_abort": stats.num_kv_blocks_used, "other": other["token_ids"]}
