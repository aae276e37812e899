"""The ingress's gRPC methods: `moe_serve.v1.MoeServe`, the standard `grpc.health.v1.Health` and
server reflection.

Ray Serve's gRPC proxy sends each call of a registered service (`grpc_stubs.servicer_functions()`)
to the ingress method of the same name (`Generate`, `GenerateStream`, `ListModels`, `Check`,
`List`, `Watch`, `ServerReflectionInfo`), with the request message (a `MalformedMessage` for
bytes that do not parse, gateway/grpc_parsing.py) and, since the parameter is named
`grpc_context`, a `RayServegRPCContext`. Everything but health checks the API key first. The
proxy answers `/ray.serve.RayServeAPIService/Healthz` itself; the standard health service comes
here like any other, so its answer is the engine's readiness.

A failed call sets its status on the context. A unary method then returns an empty message; a
streaming one must raise, because the proxy copies the context only with a streamed message or
with an exception.

The ingress that mixes this in provides `engine` (a handle to `EngineDeployment`), `tokenizer`,
`model_name`, `max_model_len`, `vocab_size` (the model's: token ids must be below it),
`max_prompt_chars` (longer text cannot fit), `max_request_bytes`, `api_key` (None: no
authentication) and `request_timeout_s` (None: no server deadline).

Deadlines: Serve's proxy does not pass the call's own deadline on, but it cancels the call when
the deadline passes, which aborts the engine request; a budget the engine itself enforces comes
from the server's `request_timeout_s` or the metadata `x-request-timeout: <seconds>`.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext

from cluster.request_output import RequestOutput
from gateway.admission import EngineDraining, EngineOverloaded
from gateway.auth import bearer_key_matches
from gateway.deadline import REQUEST_TIMEOUT_HEADER, DeadlineExceeded, effective_timeout, parse_timeout
from gateway.engine_stream import EngineFailed, engine_outputs
from gateway.errors import clip, clip_value
from gateway.generation_request import GenerationRequest
from gateway.grpc_parsing import MalformedMessage
from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.request_limits import DEFAULT_MAX_BODY_BYTES, MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS
from workers.sampling_params import SamplingParams, SamplingParamsError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MoeServe"].full_name  # "moe_serve.v1.MoeServe"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE_NAME = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
HEALTH_CHECK_TIMEOUT_S = 5.0
HEALTH_WATCH_INTERVAL_S = 1.0
# A Watch stream yields only on a change, and Serve's proxy notices that its client left only when
# it writes: a cancelled watch goes on polling until it ends. So watches end after
# HEALTH_WATCH_MAX_S (the client watches again) and a replica runs at most MAX_HEALTH_WATCHES,
# since health needs no key (tests/e2e/test_auth_routes.py opens and cancels some).
HEALTH_WATCH_MAX_S = 300.0
MAX_HEALTH_WATCHES = 64

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
# SamplingParams fields whose proto field is `optional`: unset means the dataclass default.
OPTIONAL_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed")


class GrpcError(Exception):
    """Ends a call with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    def __reduce__(self):
        # A stream's GrpcError travels to the proxy (wrapped by Serve) and must unpickle there.
        return type(self), (self.code, self.details)

    def set_on(self, grpc_context: RayServegRPCContext) -> None:
        grpc_context.set_code(self.code)
        grpc_context.set_details(self.details)


class GrpcMethods:
    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        try:
            gen = await self._admit(request, grpc_context)
            token_ids, text, logprobs, last = [], [], [], None
            async with aclosing(self._outputs(gen)) as outputs:
                async for out in outputs:
                    token_ids += out.token_ids
                    text.append(out.text)
                    logprobs += out.logprobs
                    last = out
        except GrpcError as err:
            err.set_on(grpc_context)
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            request_id=gen.request_id, model=self.model_name, token_ids=token_ids, text="".join(text),
            logprobs=_logprobs(logprobs, gen.params), finish_reason=FINISH_REASONS[last.finish_reason],
            usage=_usage(last),
        )

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            gen = await self._admit(request, grpc_context)
            async with aclosing(self._outputs(gen)) as outputs:
                async for out in outputs:
                    yield pb.GenerateStreamResponse(
                        request_id=gen.request_id, model=self.model_name, token_ids=out.token_ids,
                        text=out.text, logprobs=_logprobs(out.logprobs, gen.params),
                        finish_reason=FINISH_REASONS[out.finish_reason] if out.finished else None,
                        usage=_usage(out) if out.finished else None,
                    )
        except GrpcError as err:
            err.set_on(grpc_context)
            raise

    async def ListModels(self, request: pb.ListModelsRequest,
                         grpc_context: RayServegRPCContext) -> pb.ListModelsResponse:
        try:
            self._authenticate(grpc_context)
            _check_parsed(request)
        except GrpcError as err:
            err.set_on(grpc_context)
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=[pb.Model(id=self.model_name, max_model_len=self.max_model_len)])

    # -- grpc.health.v1.Health: unauthenticated, like HTTP /ready, since probes carry no key --------

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            error = GrpcError(grpc.StatusCode.NOT_FOUND, f"unknown service {clip(request.service)!r}")
            error.set_on(grpc_context)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=await self._serving_status())

    async def List(self, request: health_pb2.HealthListRequest,
                   grpc_context: RayServegRPCContext) -> health_pb2.HealthListResponse:
        """Every service Check knows, with its status (grpcio-health-checking's stub has List too)."""
        status = health_pb2.HealthCheckResponse(status=await self._serving_status())
        return health_pb2.HealthListResponse(statuses={name: status for name in ("", SERVICE_NAME)})

    # -- grpc.reflection.v1alpha.ServerReflection: behind the key, like our own methods ------------

    async def ServerReflectionInfo(
            self, request_stream: AsyncIterator[reflection_pb2.ServerReflectionRequest],
            grpc_context: RayServegRPCContext) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        """What grpcurl and grpcui ask; grpc_reflection's own servicer answers once the key matches."""
        async def parsed() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            async for request in request_stream:
                _check_parsed(request)
                yield request

        servicer = ReflectionServicer([SERVICE_NAME, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME])
        try:
            self._authenticate(grpc_context)
            async for response in servicer.ServerReflectionInfo(parsed(), grpc_context):
                yield response
        except GrpcError as err:
            err.set_on(grpc_context)
            raise

    _num_watches = 0  # Watch streams running on this replica
    # The ingress sets these (gateway/request_limits.py); the class values are a bare mixin's.
    max_prompt_chars: int | None = None  # None: no bound before tokenizing
    max_request_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float | None = None  # the server's deadline (gateway/deadline.py); None: none

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext | None = None,
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now and at every change (a poll each second), for at most HEALTH_WATCH_MAX_S."""
        if request.service not in ("", SERVICE_NAME):
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        if self._num_watches >= MAX_HEALTH_WATCHES:
            err = GrpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"at most {MAX_HEALTH_WATCHES} health watches at once; use Check, or retry later")
            if grpc_context is not None:
                err.set_on(grpc_context)
            raise err
        self._num_watches += 1
        try:
            last, end = None, time.monotonic() + HEALTH_WATCH_MAX_S
            while time.monotonic() < end:
                status = await self._serving_status()
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                await asyncio.sleep(HEALTH_WATCH_INTERVAL_S)
        finally:
            self._num_watches -= 1

    async def _serving_status(self) -> health_pb2.HealthCheckResponse.ServingStatus:
        """SERVING when the engine deployment answers `ready()` with True in time."""
        try:
            ready = await asyncio.wait_for(self.engine.ready.remote(), HEALTH_CHECK_TIMEOUT_S)
        except Exception:  # timed out, no replica, a replica died: all of them mean "not now"
            ready = False
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    # -- one generation --------------------------------------------------------------------------

    async def _admit(self, request: pb.GenerateRequest,
                     grpc_context: RayServegRPCContext) -> GenerationRequest:
        """Authenticate and validate a request and turn it into the engine's message."""
        self._authenticate(grpc_context)
        _check_parsed(request)
        if request.ByteSize() > self.max_request_bytes:  # the HTTP body limit, for the same work
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request is larger than the limit of {self.max_request_bytes} bytes")
        if request.model and request.model != self.model_name:
            raise GrpcError(grpc.StatusCode.NOT_FOUND,
                            f"model {clip(request.model)!r} is not served here, {self.model_name!r} is")
        try:
            params = sampling_params(request.sampling)
        except SamplingParamsError as exc:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{clip_value(str(exc))}") from None
        prompt_ids = await self._prompt_ids(request)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"sampling.max_tokens: the prompt's {len(prompt_ids)} tokens plus max_tokens "
                            f"{params.max_tokens} exceed the model's context of {self.max_model_len} tokens")
        return GenerationRequest(request_id=f"grpc-{uuid.uuid4().hex}", prompt_ids=prompt_ids, params=params,
                                 arrival_time=time.time(), timeout_s=self._grpc_timeout_s(grpc_context))

    def _grpc_timeout_s(self, grpc_context: RayServegRPCContext) -> float | None:
        metadata = dict(grpc_context.invocation_metadata())
        header = metadata.get(REQUEST_TIMEOUT_HEADER.lower())
        try:
            client_s = None if header is None else parse_timeout(header)
        except ValueError as exc:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return effective_timeout(self.request_timeout_s, client_s)

    def _authenticate(self, grpc_context: RayServegRPCContext) -> None:
        metadata = dict(grpc_context.invocation_metadata()) if self.api_key is not None else {}
        if not bearer_key_matches(metadata.get("authorization"), self.api_key):
            raise GrpcError(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key: send the metadata 'authorization: Bearer <key>'")

    async def _prompt_ids(self, request: pb.GenerateRequest) -> tuple[int, ...]:
        which = request.WhichOneof("prompt")
        if which == "text":
            if self.max_prompt_chars is not None and len(request.text) > self.max_prompt_chars:
                raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT,  # refused before tokenizing it
                                f"text: {len(request.text)} characters cannot fit in the model's context "
                                f"of {self.max_model_len} tokens")
            ids = tuple(await asyncio.to_thread(self.tokenizer.encode, request.text))  # off the event loop
        elif which == "token_ids":
            ids = tuple(request.token_ids.ids)
            if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
                raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token_ids: ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        else:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, "prompt: set text or token_ids")
        if not ids:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty")
        return ids

    async def _outputs(self, gen: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for `gen`, engine failures turned into `GrpcError`s; leaving
        early aborts the engine request (gateway/engine_stream.py)."""
        finished = False
        try:
            async with aclosing(engine_outputs(self.engine, gen)) as outputs:
                async for out in outputs:
                    finished = out.finished
                    yield out
        except EngineFailed as exc:
            raise GrpcError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except GrpcError:
            raise
        except Exception as exc:
            raise engine_error(exc) from exc
        if not finished:
            raise GrpcError(grpc.StatusCode.UNAVAILABLE, "the engine ended the request without finishing it")


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """The engine's SamplingParams; raises SamplingParamsError naming the bad field."""
    if len(msg.stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in msg.stop):
        raise SamplingParamsError("stop", f"stop: at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} "
                                          "characters each")
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise SamplingParamsError("stop_token_ids", f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS}")
    set_fields = {name: getattr(msg, name) for name in OPTIONAL_SAMPLING_FIELDS if msg.HasField(name)}
    return SamplingParams(**set_fields, stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
                          ignore_eos=msg.ignore_eos, logprobs=msg.logprobs)


def engine_error(exc: Exception) -> GrpcError:
    """The status of an exception from the engine deployment's handle."""
    cause = exc.cause if isinstance(exc, RayTaskError) else exc  # RayTaskError: raised in the replica
    if isinstance(cause, BackPressureError | EngineOverloaded):
        return GrpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded, retry later: {cause}")
    if isinstance(cause, EngineDraining):
        return GrpcError(grpc.StatusCode.UNAVAILABLE, str(cause))
    if isinstance(cause, DeadlineExceeded):
        return GrpcError(grpc.StatusCode.DEADLINE_EXCEEDED, str(cause))
    if isinstance(cause, TimeoutError):
        return GrpcError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the engine timed out: {cause}")
    if isinstance(cause, ValueError):  # the engine refused the request, e.g. it can never fit the KV cache
        return GrpcError(grpc.StatusCode.INVALID_ARGUMENT, str(cause))
    if isinstance(cause, DeploymentUnavailableError):
        return GrpcError(grpc.StatusCode.UNAVAILABLE, cause.message)
    if isinstance(cause, RayError):
        return GrpcError(grpc.StatusCode.UNAVAILABLE, f"engine unavailable: {type(cause).__name__}: {cause}")
    return GrpcError(grpc.StatusCode.INTERNAL, f"{type(cause).__name__}: {cause}")


def _logprobs(logprobs: Sequence[float | None], params: SamplingParams) -> list[float]:
    return [math.nan if lp is None else lp for lp in logprobs] if params.logprobs else []


def _usage(out: RequestOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                    total_tokens=out.num_prompt_tokens + out.num_output_tokens)


def _check_parsed(request: object) -> None:
    if isinstance(request, MalformedMessage):  # bytes that are no protobuf (gateway/grpc_parsing.py)
        raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
