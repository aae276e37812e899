"""The engine deployment: each Serve replica owns one engine (DESIGN.md §1, steps 2 → 3 and 6 → 7).

A replica runs either the single-process engine (the whole model in the replica; no expert
workers) or a distributed model group. For a group, the replica's placement group is
[replica bundle] + one bundle per worker (`placement_group_bundles`, set in `gateway.app`), and
the workers are started in bundles 1.. of it, so Serve reserves, places and frees a whole model
group with its replica.

Admission is batched: requests that arrive within `batch_wait_timeout_s` of each other enter the
engine together (`@serve.batch`), so the step loop wakes once for them and prefills them in the
same step. `@serve.batch` can batch an async generator, but such a generator cannot be streamed
through a handle, so the batched method only admits and `generate` (a plain async generator)
streams each request's outputs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ray import serve

from cluster.elastic_config import ElasticConfig
from cluster.engine_config import EngineConfig
from cluster.engine_stats import EngineStats
from cluster.expert_parallel_config import ExpertParallelConfig
from cluster.fault_config import FaultConfig
from cluster.request_handle import RequestHandle
from cluster.request_output import RequestOutput
from cluster.topology import TopologyConfig
from cluster.worker_config import WorkerConfig
from gateway import admission
from gateway.admission import DEFAULT_MAX_QUEUED_REQUESTS, EngineDraining
from gateway.deadline import DeadlineExceeded, remaining_s
from gateway.drain import DrainWatch
from gateway.generation_request import GenerationRequest
from gateway.metrics import ServingMetrics
from workers.device.memory import MemoryReport

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.002
READY_TIMEOUT_S = 5.0  # a worker that does not answer a probe this fast is not ready


@dataclass(frozen=True)
class EngineOptions:
    """What one engine replica builds."""

    model_dir: str
    engine: EngineConfig
    topology: TopologyConfig | None  # None: the single-process engine, inside the replica
    expert_parallel: ExpertParallelConfig = field(default_factory=ExpertParallelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)  # also a single-process engine's device, dtype
    faults: FaultConfig = field(default_factory=FaultConfig)
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S
    num_threads: int | None = None  # torch threads of a single-process engine; None: torch's default
    model_name: str = "moe-serve"  # the `model` label of every metric
    metrics_interval_s: float = 1.0  # how often worker stats are drained into metrics
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS  # waiting requests; more are refused (429)
    gpu_fraction: float = 1.0  # a single-process replica's share of its GPU (its KV budget)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)  # the group's expert plane (issue 16)

    def __post_init__(self) -> None:
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        if self.topology is None and self.engine.num_attention_workers != 1:
            raise ValueError("the single-process engine has exactly one attention worker")


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to validate a request before sending it."""

    max_model_len: int  # prompt + max_tokens may not exceed this
    vocab_size: int  # token ids must be below this
    memory: tuple[MemoryReport, ...] = ()  # each KV-cache holder's device, weights and cache


@serve.deployment(name="EngineDeployment")
class EngineDeployment:
    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.executor = None  # the Ray executor of a model group; None for a single-process engine
        # The model's config is read once here and handed down (the group's workers read their own).
        if options.topology is None:
            from workers.weights.checkpoint import Checkpoint

            checkpoint = Checkpoint.open(options.model_dir)
            model_config = checkpoint.config
            self.engine = self._build_local(options, checkpoint)
        else:
            from workers.weights.config import ModelConfig

            model_config = ModelConfig.from_dir(options.model_dir)
            self.engine, self.executor = self._build_distributed(options, model_config)
        self.model_info = ModelInfo(max_model_len=self.engine.max_model_len,
                                    vocab_size=model_config.vocab_size, memory=self.engine.memory)
        self._admit.set_max_batch_size(options.max_batch_size)
        self._admit.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self.num_experts = model_config.num_local_experts
        self.metrics = ServingMetrics(options.model_name)
        self._generated_seen = 0
        self.engine.step_listeners.append(self._on_step)
        self.engine.recovery.listeners.append(self.metrics.observe_recovery)  # worker faults
        self.plane = None  # a group's expert plane (cluster/expert_plane.py): stats, rebalancing, scaling
        if self.executor is not None:
            from cluster.expert_plane import ExpertPlane

            self.plane = ExpertPlane(self.executor, options.elastic)
            self.plane.stats_listeners.append(
                lambda stats: self.metrics.observe_workers(stats, self.num_experts))
            self.executor.plane_listeners.append(self.metrics.observe_plane_event)
            self.metrics.observe_placement(self.executor.placement_version, self.executor.num_expert_workers)
        self._reporter: asyncio.Task | None = None
        self._num_admitting = 0  # inside `_admit` now: not yet in the engine's waiting queue
        self._in_flight: set[str] = set()  # request ids of the `generate` streams now open
        self._drain: DrainWatch | None = None  # started by the first request (gateway/drain.py)

    def _on_step(self, stats: EngineStats) -> None:
        self.metrics.observe_engine(stats, step_ran=True)
        self.metrics.observe_tokens(stats.num_generated_tokens - self._generated_seen)
        self._generated_seen = stats.num_generated_tokens

    def _ensure_reporter(self) -> None:
        if self.executor is not None and (self._reporter is None or self._reporter.done()):
            self._reporter = asyncio.get_running_loop().create_task(self._report_workers())

    async def _report_workers(self) -> None:
        """Every metrics_interval_s: the expert plane drains the workers' counters into metrics (and
        rebalances or scales the group when its policies say so); then the engine's gauges."""
        while True:
            await asyncio.sleep(self.options.metrics_interval_s)
            try:
                await self.plane.tick()  # a worker that does not answer is skipped: the fault path reports it
            except Exception:  # the plane must never stop the metrics
                log.exception("expert plane tick failed")
            self.metrics.observe_engine(self.engine.stats(), step_ran=False)

    @staticmethod
    def _build_local(options: EngineOptions, checkpoint):
        import torch

        from cluster.local_engine import build_local_engine

        if options.num_threads:
            torch.set_num_threads(options.num_threads)
        return build_local_engine(options.model_dir, options.engine, dtype=options.worker.dtype,
                                  device=options.worker.device, gpu_fraction=options.gpu_fraction,
                                  checkpoint=checkpoint)

    @staticmethod
    def _build_distributed(options: EngineOptions, model_config):
        import ray

        from cluster.distributed_engine import build_distributed_engine
        from cluster.reservation import Reservation

        pg = ray.util.get_current_placement_group()
        if pg is None:
            raise RuntimeError("a distributed engine replica needs placement_group_bundles "
                               "(gateway.app.build_app sets them)")
        # Bundle 0 is this replica's own; the workers take 1..world_size.
        return build_distributed_engine(options.model_dir, options.engine, options.topology,
                                        expert_parallel=options.expert_parallel, worker=options.worker,
                                        faults=options.faults, reservation=Reservation(pg, first_bundle=1),
                                        model_config=model_config)

    # -- requests ---------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; cancelling the stream (client gone) aborts it, and so
        does its deadline passing (then it raises DeadlineExceeded).

        Raises EngineOverloaded at once when the waiting queue is full, EngineDraining when
        this replica is shutting down (gateway/admission.py).
        """
        self._ensure_reporter()
        await self._watch_drain()
        refused = admission.refusal(self._admission_state(), self.options.max_queued_requests)
        if refused is not None:
            raise refused
        timing = _RequestTiming(request.arrival_time)
        self._in_flight.add(request.request_id)
        self._num_admitting += 1
        try:
            admitted = await self._admit(request)
        except asyncio.CancelledError:
            self.engine.abort(request.request_id)  # the batch may have admitted it just before
            self._in_flight.discard(request.request_id)
            raise
        finally:
            self._num_admitting -= 1
        if isinstance(admitted, Exception):
            self._in_flight.discard(request.request_id)
            raise admitted  # a ValueError: this request can never fit
        last: RequestOutput | None = None
        try:
            while True:
                out = await _next_output(admitted, request)
                if self._drain is not None and self._drain.expired and out.finish_reason == "abort":
                    raise EngineDraining("the server shut down before the request finished")
                timing.saw(out)
                last = out
                yield out
                if out.finished:
                    return
        finally:
            self.engine.abort(request.request_id)  # a no-op once finished
            self._in_flight.discard(request.request_id)
            self._record(timing, last)

    def _record(self, timing: _RequestTiming, last: RequestOutput | None) -> None:
        outcome = last.finish_reason if last is not None and last.finished else "abort"
        self.metrics.observe_request(
            outcome=outcome or "abort",
            num_prompt_tokens=last.num_prompt_tokens if last else 0,
            num_output_tokens=last.num_output_tokens if last else 0,
            ttft_s=timing.ttft_s, inter_token_s=timing.gaps_s, e2e_s=time.time() - timing.arrival,
            queue_s=timing.queue_s,
        )

    def _admission_state(self) -> admission.AdmissionState:
        return admission.AdmissionState(num_unscheduled=self.engine.stats().num_waiting + self._num_admitting,
                                        draining=self._drain is not None and self._drain.draining)

    async def _watch_drain(self) -> None:
        if self._drain is None:
            context = serve.get_replica_context()
            self._drain = DrainWatch(context.app_name, context.replica_id.unique_id,
                                     count_in_flight=lambda: len(self._in_flight),
                                     on_expired=self._end_in_flight)
        await self._drain.start()

    def _end_in_flight(self) -> None:
        """The drain deadline passed: abort what is left; each stream then raises EngineDraining."""
        log.warning("drain deadline passed: ending %d requests", len(self._in_flight))
        for request_id in list(self._in_flight):
            self.engine.abort(request_id)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def _admit(self, requests: list[GenerationRequest]) -> list[RequestHandle | ValueError]:
        """Add a batch of requests to the engine at once; each gets its handle or its error."""
        admitted: list[RequestHandle | ValueError] = []
        for req in requests:
            try:
                admitted.append(self.engine.add_request(req.request_id, list(req.prompt_ids), req.params))
            except ValueError as exc:
                admitted.append(exc)
        return admitted

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    # -- observability ----------------------------------------------------------------------

    def info(self) -> ModelInfo:
        return self.model_info

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def ready(self) -> bool:
        """True when the engine can take requests: it has not given up after a worker fault,
        and every worker of its group answers a probe (not while a recovery restarts them)."""
        if not self.engine.healthy:
            log.warning("engine not ready: %s", self.engine.unhealthy_reason)
            return False
        await self._watch_drain()
        if self._drain.draining:  # shutting down: load balancers should stop sending us requests
            return False
        if self.executor is None:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*[w.where.remote() for w in self.executor.workers]),
                                   READY_TIMEOUT_S)
        except Exception as exc:  # an actor died, or hangs
            log.warning("engine not ready: %s: %s", type(exc).__name__, exc)
            return False
        return True

    def __del__(self) -> None:
        executor = getattr(self, "executor", None)
        if executor is not None:
            try:
                executor.shutdown()
            except Exception:  # Ray may be going down with us
                pass


async def _next_output(handle: RequestHandle, request: GenerationRequest) -> RequestOutput:
    """The next output, or DeadlineExceeded once the request's time is up (the caller aborts it)."""
    left = remaining_s(request.timeout_s, request.arrival_time, time.time())
    try:
        return await handle.next_output(left)
    except TimeoutError:
        raise DeadlineExceeded(f"the request did not finish within its {request.timeout_s:g} s "
                               "deadline") from None


class _RequestTiming:
    """Wall-clock marks of one request, for TTFT, inter-token latency and queue time."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.ttft_s: float | None = None
        self.queue_s: float | None = None
        self.gaps_s: list[float] = []
        self._last_token: float | None = None

    def saw(self, out: RequestOutput) -> None:
        now = time.time()
        if out.scheduled_time is not None and self.queue_s is None:
            self.queue_s = max(out.scheduled_time - self.arrival, 0.0)
        if not out.token_ids:
            return
        if self._last_token is None:
            self.ttft_s = now - self.arrival
        else:
            self.gaps_s.append(now - self._last_token)
        self._last_token = now
