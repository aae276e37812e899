"""The HTTP ingress: OpenAI-compatible routes in front of the engine deployment (DESIGN.md §1, steps 2 and 7).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (and /v1/models/{id}),
GET /health (the process is up), GET /ready (the engine and its workers are up).

A request is authenticated (optional bearer key, checked before anything else: gateway/auth.py),
parsed (strict types, 400 on anything wrong, 413 past the body limit, the request limits of
gateway/request_limits.py), checked against the model (404 for another model name, 400 for
token ids outside the vocabulary, text too long to fit, or prompt + max_tokens beyond the
context), tokenized on a thread so a long prompt does not hold up the event loop (chat template for
chat), and split into one engine request per choice
(prompts × n); their output streams are merged and sent back as one JSON body or as SSE chunks
ending in `data: [DONE]`. When the client goes away, Serve cancels this request; cancelling an
engine stream cancels the replica-side generator, which aborts the sequence and frees its KV
blocks.

The FastAPI app is built per replica (`__serve_build_asgi_app__`, after `__init__`), so the API
key and the body limit are this replica's options rather than module globals. The gRPC methods
come from the `GrpcMethods` mixin, which uses `engine` (the engine deployment's handle),
`tokenizer`, `model_name`, `max_model_len` and `api_key` from here.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter types from
# their annotations, and in a replica this class's methods are unpickled by value with only the
# globals their code uses, where string annotations ("Request", "CompletionRequest") cannot resolve.

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from cluster.request_output import RequestOutput
from gateway import errors
from gateway.admission import EngineDraining, EngineOverloaded
from gateway.auth import BearerAuthMiddleware
from gateway.body_limit import BodyLimitMiddleware
from gateway.deadline import REQUEST_TIMEOUT_HEADER, DeadlineExceeded, effective_timeout, parse_timeout
from gateway.drain import is_draining
from gateway.engine_deployment import ModelInfo
from gateway.engine_stream import EngineFailed, engine_outputs
from gateway.generation_request import GenerationRequest
from gateway.grpc_methods import GrpcMethods
from gateway.merge_streams import merge_streams
from gateway.openapi_doc import install_openapi
from gateway.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
)
from gateway.request_limits import DEFAULT_MAX_BODY_BYTES, max_prompt_chars
from gateway.response_view import ChatView, CompletionView, ResponseView, sse_events
from workers.sampling_params import SamplingParams, SamplingParamsError
from workers.tokenizer import ChatTemplateError, Tokenizer

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


@dataclass(frozen=True)
class _Job:
    """One engine request of an HTTP request: a (prompt, choice) pair."""

    index: int  # the choice index in the response
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress(GrpcMethods):
    async def __init__(self, engine: DeploymentHandle, options: IngressOptions) -> None:
        self.engine = engine
        self.options = options
        self.tokenizer = Tokenizer.from_dir(options.model_dir)
        self.model_name = options.model_name
        self.api_key = options.api_key
        # The engine's limits, asked once: this replica is ready only when an engine replica is.
        info: ModelInfo = await engine.info.remote()
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.max_prompt_chars = max_prompt_chars(self.max_model_len,
                                                 self.tokenizer.backend.get_vocab(with_added_tokens=True))
        self.max_request_bytes = options.max_body_bytes
        self.request_timeout_s = options.request_timeout_s
        self.created = int(time.time())

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="moe-serve", summary="OpenAI-compatible API of a Mixtral-style MoE model",
                      redoc_url=None)
        errors.install_error_handlers(app)
        # Added last, so outermost: a request without the key is refused before its body is read.
        app.add_middleware(BodyLimitMiddleware, max_bytes=self.options.max_body_bytes)
        app.add_middleware(BearerAuthMiddleware, api_key=self.api_key)
        app.post("/v1/completions", response_model=CompletionResponse)(self.create_completion)
        app.post("/v1/chat/completions", response_model=ChatCompletionResponse)(self.create_chat_completion)
        app.get("/v1/models", response_model=ModelList)(self.list_models)
        app.get("/v1/models/{model_id:path}", response_model=ModelCard)(self.retrieve_model)
        app.get("/health")(self.health)
        app.get("/ready")(self.ready)
        install_openapi(app, api_key_required=self.api_key is not None)
        return app

    # -- shared with the gRPC methods ---------------------------------------------------------

    async def engine_stream(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """One engine request's outputs, engine failures as `APIError`s (gateway/engine_stream.py)."""
        try:
            async with aclosing(engine_outputs(self.engine, request)) as outputs:
                async for out in outputs:
                    yield out
        except EngineFailed as exc:
            raise errors.service_unavailable(f"The engine failed the request: {exc}") from None
        # Before ValueError and RayActorError: Ray re-raises a replica's exception as a subclass
        # of both RayTaskError and the original class.
        except EngineOverloaded as exc:
            raise errors.too_many_requests(f"Too many requests: {_cause(exc)}.") from None
        except EngineDraining as exc:
            raise errors.service_unavailable(f"Unavailable: {_cause(exc)}.") from None
        except DeadlineExceeded as exc:
            raise errors.request_timeout(f"Request timed out: {_cause(exc)}.") from None
        except BackPressureError:  # Serve's own queue in front of the engine replicas is full
            raise errors.service_unavailable("The server is overloaded: too many requests are queued; "
                                             "retry later.") from None
        except (DeploymentUnavailableError, RayActorError) as exc:
            raise errors.service_unavailable(f"The engine is not available: {type(exc).__name__}.") from None
        except ValueError as exc:  # admission refused it (Ray re-raises it as RayTaskError(ValueError))
            raise errors.bad_request(str(getattr(exc, "cause", None) or exc)) from None

    # -- routes ---------------------------------------------------------------------------------

    async def create_completion(self, body: CompletionRequest, http_request: Request) -> Response:
        self._check_request(body)
        timeout_s = self._http_timeout_s(http_request)
        if len(body.prompts()) * body.n > MAX_CHOICES:  # before tokenizing any of them
            raise errors.bad_request(f"prompts × n may not exceed {MAX_CHOICES}", param="n")
        prompts = [await self._encode_prompt(p) for p in body.prompts()]
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = self._sampling_params(body, max_tokens, body.logprobs is not None)
        for ids in prompts:
            self._check_context(len(ids), max_tokens, "prompt")
        jobs = [_Job(p * body.n + c, ids, params[c]) for p, ids in enumerate(prompts) for c in range(body.n)]
        view = CompletionView(f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name, self.tokenizer,
                              num_choices=len(jobs), num_prompt_tokens=sum(len(p) for p in prompts),
                              logprobs=body.logprobs is not None)
        return await self._respond(body, jobs, view, timeout_s)

    async def create_chat_completion(self, body: ChatCompletionRequest, http_request: Request) -> Response:
        self._check_request(body)
        timeout_s = self._http_timeout_s(http_request)
        self.check_prompt_chars(body.num_content_chars(), "messages")
        try:
            prompt_ids = tuple(await asyncio.to_thread(self.tokenizer.encode_chat, body.message_dicts()))
        except ChatTemplateError as exc:
            raise errors.bad_request(errors.clip_value(str(exc)), param="messages") from None
        requested = body.requested_max_tokens
        max_tokens = requested if requested is not None else max(self.max_model_len - len(prompt_ids), 1)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = self._sampling_params(body, max_tokens, body.logprobs, max_tokens_param=param)
        self._check_context(len(prompt_ids), max_tokens, "messages")
        jobs = [_Job(c, prompt_ids, params[c]) for c in range(body.n)]
        view = ChatView(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name, self.tokenizer,
                        num_choices=len(jobs), num_prompt_tokens=len(prompt_ids), logprobs=body.logprobs)
        return await self._respond(body, jobs, view, timeout_s)

    async def list_models(self) -> ModelList:
        return ModelList(data=[self._model_card()])

    async def retrieve_model(self, model_id: str) -> ModelCard:
        if model_id != self.model_name:
            raise errors.model_not_found(model_id, [self.model_name])
        return self._model_card()

    async def health(self) -> dict:
        return {"status": "ok"}

    async def ready(self) -> JSONResponse:
        try:
            ok = await asyncio.wait_for(self._engine_ready(), READY_TIMEOUT_S)
        except Exception:  # timed out, no replica, a replica died: all mean "not ready now"
            ok = False
        if not ok:
            return errors.service_unavailable(await self._not_ready_reason()).response()
        return JSONResponse({"status": "ready"})

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
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)

    def _http_timeout_s(self, http_request: Request) -> float | None:
        """This request's time budget: the server's, or shorter with `X-Request-Timeout` (400 if bad)."""
        header = http_request.headers.get(REQUEST_TIMEOUT_HEADER)
        try:
            client_s = None if header is None else parse_timeout(header)
        except ValueError as exc:
            raise errors.bad_request(str(exc), param=REQUEST_TIMEOUT_HEADER, code="invalid_value") from None
        return effective_timeout(self.request_timeout_s, client_s)

    def _check_request(self, body: SamplingFields) -> None:
        if body.model != self.model_name:
            raise errors.model_not_found(body.model, [self.model_name])
        unsupported = body.unsupported_field()
        if unsupported is not None:
            raise errors.bad_request(f"{unsupported} is not supported by this server with that value",
                                     param=unsupported, code="unsupported_value")

    async def _encode_prompt(self, prompt: str | list[int]) -> tuple[int, ...]:
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt), "prompt")
            # On a thread: the longest text that passes takes a noticeable time to tokenize, and on
            # the event loop it would hold up every other request of this replica.
            return tuple(await asyncio.to_thread(self.tokenizer.encode, prompt))
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise errors.bad_request(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})",
                                     param="prompt", code="invalid_value")
        return tuple(prompt)

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        """Refuses text too long to fit in the context before it is tokenized (request_limits.py)."""
        if num_chars > self.max_prompt_chars:
            raise errors.prompt_too_long(self.max_model_len, num_chars, self.max_prompt_chars, param)

    @staticmethod
    def _sampling_params(body: SamplingFields, max_tokens: int, logprobs: bool,
                         max_tokens_param: str = "max_tokens") -> list[SamplingParams]:
        try:
            return [body.sampling_params(max_tokens=max_tokens, logprobs=logprobs, choice=c)
                    for c in range(body.n)]
        except SamplingParamsError as exc:
            param = max_tokens_param if exc.field == "max_tokens" else exc.field
            raise errors.bad_request(errors.clip_value(str(exc)).replace("max_tokens", param, 1), param=param,
                                     code="invalid_value") from None

    def _check_context(self, num_prompt_tokens: int, max_tokens: int, param: str) -> None:
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise errors.context_length_exceeded(self.max_model_len, num_prompt_tokens, max_tokens, param)

    async def _respond(self, body: SamplingFields, jobs: Sequence[_Job], view: ResponseView,
                       timeout_s: float | None) -> Response:
        arrival = time.time()
        streams = [self.engine_stream(GenerationRequest(f"{view.rid}-{job.index}", job.prompt_ids, job.params,
                                                        arrival, timeout_s))
                   for job in jobs]  # jobs are in choice order: a stream's index is its choice's
        outputs = merge_streams(streams)
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


def _cause(exc: Exception) -> str:
    """The message of the replica-side exception a RayTaskError wraps (its own str has a traceback)."""
    return str(getattr(exc, "cause", None) or exc)


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()
