"""The ingress: OpenAI-compatible HTTP routes and the gRPC service in front of the engine
deployment (DESIGN.md §1, steps 2 and 7).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and /v1/models/{id}),
GET /health (the process is up), GET /ready (the engine and its workers are up). gRPC: the
methods Serve's gRPC proxy calls by name, each handed to `GrpcService` (gateway/grpc_methods.py).

Both protocols take a request through the same steps: authentication (optional bearer key,
gateway/auth.py), the front door (gateway/front_door.py: every limit, the model, tokenizing and
the chat template; a bad request is a `Refusal`), then the engine stream (gateway/engine_stream.py:
engine failures are refusals too). This module and the gRPC service only render: an HTTP request
is split into one engine request per choice (prompts × n), whose output streams are merged and sent
back as one JSON body or as SSE chunks ending in `data: [DONE]`; a refusal is a status code and
OpenAI's error body (gateway/errors.py). When the client goes away, Serve cancels this request;
cancelling an engine stream cancels the replica-side generator, which aborts the sequence and
frees its KV blocks.

The FastAPI app is built per replica (`__serve_build_asgi_app__`, after `__init__`), so the API
key and the body limit are this replica's options rather than module globals.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter types from
# their annotations, and in a replica this class's methods are unpickled by value with only the
# globals their code uses, where string annotations ("Request", "CompletionRequest") cannot resolve.

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from cluster.tokenizer import Tokenizer
from gateway import errors
from gateway.auth import BearerAuthMiddleware
from gateway.body_limit import BodyLimitMiddleware
from gateway.deadline import REQUEST_TIMEOUT_HEADER
from gateway.drain import is_draining
from gateway.engine_deployment import ModelInfo
from gateway.engine_stream import engine_outputs
from gateway.front_door import Admitted, FrontDoor, ServingLimits
from gateway.grpc_methods import GrpcService
from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.merge_streams import merge_streams
from gateway.openapi_doc import install_openapi
from gateway.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
)
from gateway.refusal import Kind, Refusal
from gateway.request_limits import DEFAULT_MAX_BODY_BYTES
from gateway.response_view import ChatView, CompletionView, ResponseView, sse_events

T = TypeVar("T")
READY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class IngressOptions:
    model_dir: str
    model_name: str  # what clients put in `model`
    api_key: str | None = field(default=None, repr=False)  # None: no authentication
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float | None = None  # each request's deadline; None: none unless the client sets one

    def __post_init__(self) -> None:
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 or None, got {self.request_timeout_s}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be None (no authentication) or a non-empty string")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    async def __init__(self, engine: DeploymentHandle, options: IngressOptions) -> None:
        # The engine's limits, asked once: this replica is ready only when an engine replica is.
        info: ModelInfo = await engine.info.remote()
        self.setup(engine, options, Tokenizer.from_dir(options.model_dir), info)

    def setup(self, engine: DeploymentHandle, options: IngressOptions, tokenizer: Tokenizer,
              info: ModelInfo) -> None:
        """What `__init__` builds from what it asked for (tests call it without Ray)."""
        self.engine = engine
        self.options = options
        limits = ServingLimits(model_name=options.model_name, max_model_len=info.max_model_len,
                               vocab_size=info.vocab_size, max_request_bytes=options.max_body_bytes,
                               request_timeout_s=options.request_timeout_s)
        self.front_door = FrontDoor(tokenizer, limits)
        self.grpc = GrpcService(self.front_door, engine, options.api_key)
        self.created = int(time.time())

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="moe-serve", summary="OpenAI-compatible API of a Mixtral-style MoE model",
                      redoc_url=None)
        errors.install_error_handlers(app)
        # Added last, so outermost: a request without the key is refused before its body is read.
        app.add_middleware(BodyLimitMiddleware, max_bytes=self.options.max_body_bytes)
        app.add_middleware(BearerAuthMiddleware, api_key=self.options.api_key)
        app.post("/v1/completions", response_model=CompletionResponse)(self.create_completion)
        app.post("/v1/chat/completions", response_model=ChatCompletionResponse)(self.create_chat_completion)
        app.get("/v1/models", response_model=ModelList)(self.list_models)
        app.get("/v1/models/{model_id:path}", response_model=ModelCard)(self.retrieve_model)
        app.get("/health")(self.health)
        app.get("/ready")(self.ready)
        install_openapi(app, api_key_required=self.options.api_key is not None)
        return app

    # -- HTTP routes ----------------------------------------------------------------------------

    async def create_completion(self, body: CompletionRequest, http_request: Request) -> Response:
        rid = f"cmpl-{uuid.uuid4().hex}"
        admitted = await self.front_door.completion(body, rid, _timeout_header(http_request))
        return await self._respond(body, admitted, CompletionView, rid, logprobs=body.logprobs is not None)

    async def create_chat_completion(self, body: ChatCompletionRequest, http_request: Request) -> Response:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        admitted = await self.front_door.chat(body, rid, _timeout_header(http_request))
        return await self._respond(body, admitted, ChatView, rid, logprobs=body.logprobs)

    async def list_models(self) -> ModelList:
        return ModelList(data=[self._model_card()])

    async def retrieve_model(self, model_id: str) -> ModelCard:
        self.front_door.check_model(model_id)
        return self._model_card()

    async def health(self) -> dict:
        return {"status": "ok"}

    async def ready(self) -> JSONResponse:
        try:
            ok = await asyncio.wait_for(self._engine_ready(), READY_TIMEOUT_S)
        except Exception:  # timed out, no replica, a replica died: all mean "not ready now"
            ok = False
        if not ok:
            return errors.api_error(Refusal(Kind.UNAVAILABLE, await self._not_ready_reason())).response()
        return JSONResponse({"status": "ready"})

    # -- gRPC: Serve's proxy calls these by name; the service does the work ----------------------

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext) -> pb.GenerateResponse:
        return await self.grpc.Generate(request, grpc_context)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with aclosing(self.grpc.GenerateStream(request, grpc_context)) as stream:
            async for message in stream:
                yield message

    async def ListModels(self, request: pb.ListModelsRequest,
                         grpc_context: RayServegRPCContext) -> pb.ListModelsResponse:
        return await self.grpc.ListModels(request, grpc_context)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext) -> health_pb2.HealthCheckResponse:
        return await self.grpc.Check(request, grpc_context)

    async def List(self, request: health_pb2.HealthListRequest,
                   grpc_context: RayServegRPCContext) -> health_pb2.HealthListResponse:
        return await self.grpc.List(request, grpc_context)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    grpc_context: RayServegRPCContext | None = None,
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        async with aclosing(self.grpc.Watch(request, grpc_context)) as stream:
            async for message in stream:
                yield message

    async def ServerReflectionInfo(
            self, request_stream: AsyncIterator[reflection_pb2.ServerReflectionRequest],
            grpc_context: RayServegRPCContext) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async with aclosing(self.grpc.ServerReflectionInfo(request_stream, grpc_context)) as stream:
            async for message in stream:
                yield message

    # -- helpers --------------------------------------------------------------------------------

    async def _engine_ready(self) -> bool:
        return await self.engine.ready.remote()

    async def _not_ready_reason(self) -> str:
        try:
            draining = await asyncio.to_thread(is_draining, serve.get_replica_context().app_name)
        except Exception:  # Ray is going down with us: the generic reason will do
            draining = False
        if draining:  # a shutdown, not a fault: load balancers should move on, nobody needs paging
            return "The server is draining: it is shutting down and takes no new requests."
        return "The engine or one of its workers is not ready."

    def _model_card(self) -> ModelCard:
        return ModelCard(id=self.options.model_name, created=self.created,
                         max_model_len=self.front_door.limits.max_model_len)

    async def _respond(self, body: SamplingFields, admitted: Admitted, view_type: type[ResponseView],
                       rid: str, *, logprobs: bool) -> Response:
        view = view_type(rid, int(time.time()), self.options.model_name, self.front_door.tokenizer,
                         num_choices=len(admitted.requests), num_prompt_tokens=admitted.num_prompt_tokens,
                         logprobs=logprobs)
        # The requests are in choice order: a stream's index is its choice's.
        outputs = merge_streams([engine_outputs(self.engine, request) for request in admitted.requests])
        if not body.stream:
            async with aclosing(outputs):
                async for index, out in outputs:
                    view.add(index, out)
            return JSONResponse(view.response().model_dump(mode="json"))
        # Wait for the first output before sending headers: errors at admission (400, 503) still
        # get their own status code instead of an error event inside a 200 stream.
        try:
            first = await anext(outputs)
        except BaseException:
            await outputs.aclose()
            raise
        return StreamingResponse(sse_events(view, _prepend(first, outputs), include_usage=body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _timeout_header(http_request: Request) -> str | None:
    return http_request.headers.get(REQUEST_TIMEOUT_HEADER)


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()
