"""The engine: continuous batching over one worker group (DESIGN.md §1, steps 3–6).

Requests arrive at any time through `generate()`, an async iterator of RequestOutputs.
One background task runs the step loop: each attention worker (data-parallel rank) has
its own scheduler and KV block manager, since a sequence's KV cache lives on exactly one
worker; every step asks each scheduler for a batch, has the executor run all of them as
one lock-step model step, then appends the sampled tokens, checks stop conditions and
streams the new tokens to their requests.

Worker faults (DESIGN.md §5): when the executor raises `WorkerFailed`, the step is dropped,
every running sequence goes back to the waiting queue (the KV caches are gone with the
workers), the executor replaces its workers, and the loop carries on: the next steps
prefill those sequences again from prompt + generated ids, so a greedy continuation is the
one it would have been. Streams pause meanwhile. When the recovery policy refuses, or the
recovery itself fails, every request ends with an explicit error and the engine turns
unhealthy for good: new requests get the same error at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cluster.block_manager import BlockManager
from cluster.engine_config import EngineConfig
from cluster.executor import Executor
from cluster.recovery_event import RecoveryEvent
from cluster.recovery_policy import RecoveryPolicy
from cluster.request_output import EngineStats, RequestOutput
from cluster.scheduler import Scheduler
from cluster.sequence import FinishReason, Sequence
from cluster.stop_checker import StopChecker
from cluster.worker_fault import WorkerFailed, WorkerFault
from workers.batch_spec import ScheduledBatch
from workers.device_memory import MemoryReport
from workers.sampling_params import SamplingParams
from workers.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    seq: Sequence
    rank: int  # the attention worker that holds its KV cache
    stop: StopChecker
    detokenizer: IncrementalDetokenizer | None
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    scheduled_time: float | None = None  # wall clock of its first step (queue time ends here)


class Engine:
    def __init__(self, executor: Executor, config: EngineConfig, *, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = (), tokenizer: Tokenizer | None = None,
                 recovery: RecoveryPolicy | None = None, memory: tuple[MemoryReport, ...] = ()) -> None:
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
        self._loop_task: asyncio.Task | None = None
        self._num_steps = 0
        self._last_step_tokens = 0
        self._last_step_seconds = 0.0
        self._num_generated = 0
        self.step_listeners: list[Callable[[EngineStats], None]] = []  # e.g. the metrics recorder
        self.recovery = recovery or RecoveryPolicy()
        self.recovery_listeners: list[Callable[[RecoveryEvent], None]] = []
        self._recovery_times: list[float] = []  # time.monotonic() of each recovery attempt
        self._num_worker_faults = 0
        self._num_recoveries = 0
        self.unhealthy_reason: str | None = None  # set once, when the engine gives up

    @property
    def healthy(self) -> bool:
        """False once a worker fault could not be recovered: every request then fails at once."""
        return self.unhealthy_reason is None

    @property
    def max_model_len(self) -> int:
        return self.scheduler_config.max_seq_len

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request; closing the iterator early aborts it."""
        req = self.add_request(request_id, prompt_ids, params)
        try:
            while True:
                out = await req.queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self.abort(request_id)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> _Request:
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
            return req
        self.schedulers[rank].add(seq)  # raises ValueError when it can never fit
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
        stop = StopChecker(params, self.eos_token_ids, self.max_model_len)
        req = _Request(request_id, seq, rank, stop, detok)
        self._requests[seq.seq_id] = req
        self._by_request_id[request_id] = seq.seq_id
        self._ensure_loop()
        self._wake.set()
        return req

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

    # -- step loop --------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

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
        batches = tuple(s.schedule() or ScheduledBatch(()) for s in self.schedulers)
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
            await self._recover(exc.fault)
            return  # the loop schedules again: lost sequences prefill, the rest of the step re-runs
        self._last_step_seconds = time.perf_counter() - t0
        self._last_step_tokens = sum(b.num_tokens for b in batches)
        self._num_steps += 1
        for scheduler, batch, out in zip(self.schedulers, batches, outputs, strict=True):
            logprobs = out.logprob_of()
            for seq in scheduler.update(batch, out.sampled()):
                req = self._requests.get(seq.seq_id)
                if req is not None:
                    self._on_token(scheduler, req, logprobs.get(seq.seq_id))
        if self.step_listeners:
            stats = self.stats()
            for listener in self.step_listeners:
                listener(stats)

    def _on_token(self, scheduler: Scheduler, req: _Request, logprob: float | None) -> None:
        seq = req.seq
        token = seq.output_ids[-1]
        self._num_generated += 1
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

    def _fail_all(self, message: str) -> None:
        for req in list(self._requests.values()):
            self.schedulers[req.rank].abort(req.seq.seq_id)
            self._finish(req, "error", emit=True, error=message)

    # -- worker faults ----------------------------------------------------------------------

    async def _recover(self, fault: WorkerFault) -> None:
        """Replace the executor's workers and requeue what lost its KV cache, or give up."""
        t0 = time.perf_counter()
        now = time.monotonic()
        self._num_worker_faults += 1
        log.error("engine step failed: %s", fault.describe())
        num_requeued = sum(len(s.requeue_running()) for s in self.schedulers)
        if not self.recovery.may_recover(self._recovery_times, now):
            why = (f"{self.recovery.max_recoveries} recoveries within {self.recovery.window_s:g}s "
                   f"already; not trying again")
            self._give_up(fault, why)
            self._emit(RecoveryEvent(fault, "refused", time.perf_counter() - t0, (), num_requeued, why))
            return
        self._recovery_times.append(now)
        log.warning("recovering: restarting the model group, %d sequences will prefill again", num_requeued)
        try:
            kinds = await self.executor.recover(fault, self.recovery.timeout_s)
        except Exception as exc:  # no resources, a worker that cannot start, a timeout
            why = f"recovery failed: {type(exc).__name__}: {exc}"
            log.exception("engine recovery failed")
            self._give_up(fault, why)
            self._emit(RecoveryEvent(fault, "failed", time.perf_counter() - t0, (), num_requeued, why))
            return
        self._num_recoveries += 1
        seconds = time.perf_counter() - t0
        log.warning("recovered in %.2fs (%d workers restarted) from: %s", seconds, len(kinds),
                    fault.describe())
        self._emit(RecoveryEvent(fault, "recovered", seconds, tuple(kinds), num_requeued))

    def _give_up(self, fault: WorkerFault, why: str) -> None:
        self.unhealthy_reason = f"engine unavailable: {fault.describe()}; {why}"
        log.error("%s", self.unhealthy_reason)
        self._fail_all(self.unhealthy_reason)

    def _emit(self, event: RecoveryEvent) -> None:
        for listener in self.recovery_listeners:
            try:
                listener(event)
            except Exception:  # metrics must never take the engine down
                log.exception("recovery listener failed")

    # -- observability ----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=sum(s.num_running for s in self.schedulers),
            num_waiting=sum(s.num_waiting for s in self.schedulers),
            num_kv_blocks_used=sum(s.block_manager.num_used_blocks for s in self.schedulers),
            num_kv_blocks_total=self.config.num_kv_blocks * len(self.schedulers),
            num_preemptions=sum(s.num_preemptions for s in self.schedulers),
            num_steps=self._num_steps,
            last_step_tokens=self._last_step_tokens,
            last_step_seconds=self._last_step_seconds,
            num_generated_tokens=self._num_generated,
            num_worker_faults=self._num_worker_faults,
            num_recoveries=self._num_recoveries,
            healthy=self.healthy,
        )

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
