"""The engine: continuous batching over one executor (DESIGN.md §1, steps 3–6).

Requests arrive at any time through `add_request` (a RequestHandle: an async iterator of
RequestOutputs) or `generate()` (the same, aborting the request when closed early). One
background task runs the step loop: each attention worker (data-parallel rank) has its own
scheduler and KV block manager, since a sequence's KV cache lives on exactly one worker;
every step asks each scheduler for a batch, has the executor run all of them as one
lock-step model step, then appends the sampled tokens, checks stop conditions and streams
the new tokens to their requests.

A step that fails with `WorkerFailed` goes to recovery (cluster/recovery.py), which requeues
the running sequences and replaces the executor's workers, or gives up and fails every
request; the loop then schedules again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cluster.block_manager import BlockManager
from cluster.dispatch_mode import with_dispatch_mode
from cluster.engine_config import EngineConfig
from cluster.engine_stats import EngineStats, StepCounters, collect_stats
from cluster.executor import Executor
from cluster.listeners import notify
from cluster.recovery import Recovery
from cluster.recovery_policy import RecoveryPolicy
from cluster.request_handle import RequestHandle
from cluster.request_output import RequestOutput
from cluster.scheduler import Scheduler
from cluster.sequence import FinishReason, Sequence
from cluster.stop_checker import StopChecker
from cluster.tokenizer import IncrementalDetokenizer, Tokenizer
from cluster.worker_fault import WorkerFailed
from workers.device.memory import MemoryReport
from workers.model.batch_spec import ScheduledBatch
from workers.model.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    rank: int  # the attention worker that holds its KV cache
    stop: StopChecker
    detokenizer: IncrementalDetokenizer | None
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)  # read by its RequestHandle
    scheduled_time: float | None = None  # wall clock of its first step (queue time ends here)


class Engine:
    def __init__(self, executor: Executor, config: EngineConfig, *, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = (), tokenizer: Tokenizer | None = None,
                 recovery_policy: RecoveryPolicy | None = None,
                 memory: tuple[MemoryReport, ...] = ()) -> None:
        if executor.num_attention_workers != config.num_attention_workers:
            raise ValueError(f"executor has {executor.num_attention_workers} attention workers, "
                             f"config says {config.num_attention_workers}")
        self.executor = executor
        self.config = config
        self.memory = memory  # what each KV-cache holder has on its device, for logs and the banner
        self.scheduler_config = config.scheduler_config(max_model_len)
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids or (tokenizer.eos_token_ids if tokenizer else ())
        self.schedulers = [
            Scheduler(self.scheduler_config, BlockManager(config.num_kv_blocks, config.block_size))
            for _ in range(config.num_attention_workers)
        ]
        self._requests: dict[int, _Request] = {}
        self._by_request_id: dict[str, int] = {}
        self._seq_ids = itertools.count()
        self._wake = asyncio.Event()
        self._wake_loop: asyncio.AbstractEventLoop | None = None
        self._loop_task: asyncio.Task | None = None
        self._steps = StepCounters()
        self.step_listeners: list[Callable[[EngineStats], None]] = []  # e.g. the metrics recorder
        self.recovery = Recovery(recovery_policy)  # its listeners hear of every worker fault

    @property
    def healthy(self) -> bool:
        """False once a worker fault could not be recovered: every request then fails at once."""
        return self.recovery.healthy

    @property
    def unhealthy_reason(self) -> str | None:
        """Why the engine gave up (the error every request gets); None while healthy."""
        return self.recovery.unhealthy_reason

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_seq_len

    def stats(self) -> EngineStats:
        return collect_stats(self.schedulers, self.config.num_kv_blocks, self._steps, self.recovery)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request; closing the iterator early aborts it."""
        handle = self.add_request(request_id, prompt_ids, params)
        try:
            async for out in handle:
                yield out
        finally:
            self.abort(request_id)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue one request; its outputs arrive through the handle (cluster/request_handle.py).

        Raises ValueError when the request can never run (a duplicate id, an empty prompt, more
        tokens than the KV cache holds). An unhealthy engine returns a handle whose only
        output is the error.
        """
        if request_id in self._by_request_id:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        rank = self._pick_rank()
        seq = Sequence(seq_id=next(self._seq_ids), prompt_ids=list(prompt_ids), sampling=params,
                       arrival_time=time.monotonic())
        if not self.healthy:  # an explicit error now beats a request nobody will ever step
            req = _Request(request_id, seq, rank, StopChecker(params, self.eos_token_ids, self.max_model_len),
                           None)
            self._finish(req, "error", emit=True, error=self.unhealthy_reason)
            return RequestHandle(request_id, req.queue)
        self.schedulers[rank].add(seq)  # raises ValueError when it can never fit
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
        stop = StopChecker(params, self.eos_token_ids, self.max_model_len)
        req = _Request(request_id, seq, rank, stop, detok)
        self._requests[seq.seq_id] = req
        self._by_request_id[request_id] = seq.seq_id
        self._ensure_loop()
        self._wake.set()
        return RequestHandle(request_id, req.queue)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it was not in flight."""
        seq_id = self._by_request_id.get(request_id)
        if seq_id is None:
            return False
        req = self._requests[seq_id]
        self.schedulers[req.rank].abort(seq_id)
        self._finish(req, "abort", emit=True)
        return True

    def _pick_rank(self) -> int:
        """Data parallelism: the attention worker with the fewest sequences."""
        loads = [s.num_running + s.num_waiting for s in self.schedulers]
        return loads.index(min(loads))

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            loop = asyncio.get_running_loop()
            if self._wake_loop is not loop:  # an Event binds to the loop that first waits on it
                self._wake, self._wake_loop = asyncio.Event(), loop
            self._loop_task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not any(s.has_work for s in self.schedulers):
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.step()
            except Exception as exc:  # a failed step must not hang its requests
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {type(exc).__name__}")

    async def step(self) -> None:
        batches = with_dispatch_mode(tuple(s.schedule() or ScheduledBatch(()) for s in self.schedulers),
                                     self.config.low_latency_max_tokens)
        now = time.time()
        for batch in batches:
            for scheduled in batch.seqs:
                req = self._requests.get(scheduled.seq_id)
                if req is not None and req.scheduled_time is None:
                    req.scheduled_time = now
        t0 = time.perf_counter()
        try:
            outputs = await self.executor.execute(batches)
        except WorkerFailed as exc:
            await self.recovery.recover(exc.fault, self.executor, requeue_running=self._requeue_running,
                                        fail_all=self._fail_all)
            return  # the loop schedules again: lost sequences prefill, the rest of the step re-runs
        self._steps.step_ran(sum(b.num_tokens for b in batches), time.perf_counter() - t0)
        for scheduler, batch, out in zip(self.schedulers, batches, outputs, strict=True):
            logprobs = out.logprob_of()
            for seq in scheduler.update(batch, out.sampled()):
                req = self._requests.get(seq.seq_id)
                if req is not None:
                    self._on_token(scheduler, req, logprobs.get(seq.seq_id))
        if self.step_listeners:  # a listener that raises is logged: it must not fail every request
            notify(self.step_listeners, self.stats(), "engine step")

    def _on_token(self, scheduler: Scheduler, req: _Request, logprob: float | None) -> None:
        seq = req.seq
        token = seq.output_ids[-1]
        self._steps.num_generated_tokens += 1
        delta = req.detokenizer.push([token]) if req.detokenizer else ""
        decision = req.stop.check(token, delta, seq.num_output_tokens, seq.num_tokens)
        text = decision.text
        if decision.finished and req.detokenizer is not None and decision.reason == "length":
            text += req.detokenizer.flush()
        out = RequestOutput(
            request_id=req.request_id, token_ids=(token,), text=text, logprobs=(logprob,),
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            finished=decision.finished, finish_reason=decision.reason, scheduled_time=req.scheduled_time,
        )
        req.queue.put_nowait(out)
        if decision.finished:
            scheduler.finish(seq, FinishReason(decision.reason))
            self._forget(req)

    def _finish(self, req: _Request, reason: str, *, emit: bool, error: str | None = None) -> None:
        if emit:
            req.queue.put_nowait(RequestOutput(
                request_id=req.request_id, token_ids=(), text="", logprobs=(),
                num_prompt_tokens=req.seq.num_prompt_tokens, num_output_tokens=req.seq.num_output_tokens,
                finished=True, finish_reason=reason, error=error, scheduled_time=req.scheduled_time,
            ))
        self._forget(req)

    def _forget(self, req: _Request) -> None:
        self._requests.pop(req.seq.seq_id, None)
        if self._by_request_id.get(req.request_id) == req.seq.seq_id:
            del self._by_request_id[req.request_id]

    def _requeue_running(self, ranks: tuple[int, ...] | None = None) -> int:
        """After a worker fault: the running sequences of these attention ranks (None: all) back to
        waiting (their KV caches are gone)."""
        schedulers = self.schedulers if ranks is None else [self.schedulers[r] for r in ranks]
        return sum(len(s.requeue_running()) for s in schedulers)

    def _fail_all(self, message: str) -> None:
        for req in list(self._requests.values()):
            self.schedulers[req.rank].abort(req.seq.seq_id)
            self._finish(req, "error", emit=True, error=message)

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
