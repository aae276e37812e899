"""The ingress's gRPC methods: `moe_serve.v1.MoeServe`, the standard `grpc.health.v1.Health` and
server reflection.

Ray Serve's gRPC proxy sends each call of a registered service (`grpc_stubs.servicer_functions()`)
to the ingress method of the same name (`Generate`, `GenerateStream`, `ListModels`, `Check`,
`List`, `Watch`, `ServerReflectionInfo`), with the request message (a `MalformedMessage` for
bytes that do not parse, gateway/grpc_parsing.py) and, since the parameter is named
`grpc_context`, a `RayServegRPCContext`; the ingress hands each call to its `GrpcService`. That
holds what the methods need: the front door (gateway/front_door.py: the same checks and messages
as HTTP), the engine deployment's handle and the API key. Everything but health checks the key
first. The proxy answers `/ray.serve.RayServeAPIService/Healthz` itself; the standard health
service comes here like any other, so its answer is the engine's readiness.

A failed call sets its status (gateway/grpc_status.py: a refusal's kind as a status code) on the
context. A unary method then returns an empty message; a streaming one must raise, because the
proxy copies the context only with a streamed message or with an exception.

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
from ray.serve.grpc_util import RayServegRPCContext

from cluster.request_output import RequestOutput
from gateway import refusal
from gateway.auth import bearer_key_matches
from gateway.deadline import REQUEST_TIMEOUT_HEADER
from gateway.engine_stream import engine_outputs
from gateway.front_door import FrontDoor
from gateway.generation_request import GenerationRequest
from gateway.grpc_parsing import check_parsed
from gateway.grpc_status import GrpcError, grpc_error
from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.refusal import Kind, Refusal, clip
from workers.model.sampling_params import SamplingParams

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


class GrpcService:
    """The gRPC methods of one ingress replica."""

    def __init__(self, front_door: FrontDoor, engine, api_key: str | None) -> None:
        self.front_door = front_door
        self.engine = engine  # a handle to `EngineDeployment`
        self.api_key = api_key  # None: no authentication
        self._num_watches = 0  # Watch streams running on this replica

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        try:
            gen = await self._admit(request, grpc_context)
            token_ids, text, logprobs, last = [], [], [], None
            async with aclosing(engine_outputs(self.engine, gen)) as outputs:
                async for out in outputs:
                    token_ids += out.token_ids
                    text.append(out.text)
                    logprobs += out.logprobs
                    last = out
        except Refusal as refused:
            grpc_error(refused).set_on(grpc_context)
            return pb.GenerateResponse()
        return pb.GenerateResponse(
            request_id=gen.request_id, model=self._model_name, token_ids=token_ids, text="".join(text),
            logprobs=_logprobs(logprobs, gen.params), finish_reason=FINISH_REASONS[last.finish_reason],
            usage=_usage(last),
        )

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            gen = await self._admit(request, grpc_context)
            async with aclosing(engine_outputs(self.engine, gen)) as outputs:
                async for out in outputs:
                    yield pb.GenerateStreamResponse(
                        request_id=gen.request_id, model=self._model_name, token_ids=out.token_ids,
                        text=out.text, logprobs=_logprobs(out.logprobs, gen.params),
                        finish_reason=FINISH_REASONS[out.finish_reason] if out.finished else None,
                        usage=_usage(out) if out.finished else None,
                    )
        except Refusal as refused:
            raise _failed(grpc_context, refused) from None

    async def ListModels(self, request: pb.ListModelsRequest,
                         grpc_context: RayServegRPCContext) -> pb.ListModelsResponse:
        try:
            self._authenticate(grpc_context)
            check_parsed(request)
        except Refusal as refused:
            grpc_error(refused).set_on(grpc_context)
            return pb.ListModelsResponse()
        model = pb.Model(id=self._model_name, max_model_len=self.front_door.limits.max_model_len)
        return pb.ListModelsResponse(models=[model])

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

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext | None = None,
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now and at every change (a poll each second), for at most HEALTH_WATCH_MAX_S."""
        if request.service not in ("", SERVICE_NAME):
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        if self._num_watches >= MAX_HEALTH_WATCHES:
            too_many = Refusal(Kind.OVERLOADED, f"at most {MAX_HEALTH_WATCHES} health watches at once; "
                                                "use Check, or retry later")
            raise _failed(grpc_context, too_many)
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

    # -- grpc.reflection.v1alpha.ServerReflection: behind the key, like our own methods ------------

    async def ServerReflectionInfo(
            self, request_stream: AsyncIterator[reflection_pb2.ServerReflectionRequest],
            grpc_context: RayServegRPCContext) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        """What grpcurl and grpcui ask; grpc_reflection's own servicer answers once the key matches."""
        async def parsed() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            async for request in request_stream:
                check_parsed(request)
                yield request

        servicer = ReflectionServicer([SERVICE_NAME, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME])
        try:
            self._authenticate(grpc_context)
            async for response in servicer.ServerReflectionInfo(parsed(), grpc_context):
                yield response
        except Refusal as refused:
            raise _failed(grpc_context, refused) from None

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def _model_name(self) -> str:
        return self.front_door.limits.model_name

    async def _serving_status(self) -> health_pb2.HealthCheckResponse.ServingStatus:
        """SERVING when the engine deployment answers `ready()` with True in time."""
        try:
            ready = await asyncio.wait_for(self.engine.ready.remote(), HEALTH_CHECK_TIMEOUT_S)
        except Exception:  # timed out, no replica, a replica died: all of them mean "not now"
            ready = False
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def _admit(self, request: pb.GenerateRequest,
                     grpc_context: RayServegRPCContext) -> GenerationRequest:
        """Authenticate a request, then let the front door check it and make the engine's message."""
        self._authenticate(grpc_context)
        metadata = dict(grpc_context.invocation_metadata())
        return await self.front_door.generate(request, f"grpc-{uuid.uuid4().hex}",
                                              metadata.get(REQUEST_TIMEOUT_HEADER.lower()))

    def _authenticate(self, grpc_context: RayServegRPCContext) -> None:
        metadata = dict(grpc_context.invocation_metadata()) if self.api_key is not None else {}
        if not bearer_key_matches(metadata.get("authorization"), self.api_key):
            raise refusal.unauthenticated()


def _failed(grpc_context: RayServegRPCContext | None, refused: Refusal) -> GrpcError:
    """The error a streaming method raises, its status set on the context."""
    error = grpc_error(refused)
    if grpc_context is not None:
        error.set_on(grpc_context)
    return error


def _logprobs(logprobs: Sequence[float | None], params: SamplingParams) -> list[float]:
    return [math.nan if lp is None else lp for lp in logprobs] if params.logprobs else []


def _usage(out: RequestOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                    total_tokens=out.num_prompt_tokens + out.num_output_tokens)
