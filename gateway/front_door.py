"""The front door: every generation request, HTTP or gRPC, is checked here and turned into the
engine's messages (DESIGN.md §1, step 2).

In: a parsed OpenAI body (`CompletionRequest`, `ChatCompletionRequest`, whose types pydantic has
checked: gateway/protocol.py) or a gRPC `GenerateRequest`. Out: `GenerationRequest`s for the
engine deployment, one per choice, or a `Refusal` (gateway/refusal.py) with its kind, the field
and a message that is the same whichever protocol the request came by. Every limit of
gateway/request_limits.py is checked here, in one order, cheapest first: model, deadline header,
(HTTP: n, fields we do not implement), sampling values, the prompt (its size before it is
tokenized, then the vocabulary), the context. Text is tokenized on a thread, off the event loop,
so a long prompt does not hold up the replica's other requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster.tokenizer import ChatTemplateError, Tokenizer
from gateway import refusal
from gateway.deadline import REQUEST_TIMEOUT_HEADER, effective_timeout, parse_timeout
from gateway.generation_request import GenerationRequest
from gateway.grpc_parsing import MalformedMessage, check_parsed
from gateway.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    Prompt,
    SamplingFields,
)
from gateway.request_limits import (
    CHOICES,
    DEFAULT_MAX_BODY_BYTES,
    MAX_TOKENS,
    MESSAGES,
    OPENAI_BOUNDS,
    SAMPLING_BOUNDS,
    STOP,
    STOP_CHARS,
    STOP_TOKEN_IDS,
    TOKEN_ID,
    Bound,
    max_prompt_chars,
)
from workers.model.sampling_params import SamplingParams, SamplingParamsError

if TYPE_CHECKING:
    from gateway.grpc_stubs import moe_serve_pb2 as pb

# gRPC SamplingParams fields that are `optional` in the proto: unset means the dataclass default.
OPTIONAL_GRPC_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed")


@dataclass(frozen=True)
class ServingLimits:
    """What a request is checked against: the served model and this server's own limits."""

    model_name: str  # what `model` must be
    max_model_len: int  # prompt + max_tokens may not exceed it
    vocab_size: int  # token ids must be below it
    max_request_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout_s: float | None = None  # the server's deadline (gateway/deadline.py); None: none


@dataclass(frozen=True)
class Admitted:
    """An HTTP request the front door let in: one engine request per choice, in choice order."""

    requests: tuple[GenerationRequest, ...]
    num_prompt_tokens: int  # each prompt counted once, whatever n is


class FrontDoor:
    """`completion` and `chat` take OpenAI bodies, `generate` a gRPC message; each returns what the
    engine gets or raises a `Refusal`."""

    def __init__(self, tokenizer: Tokenizer, limits: ServingLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_prompt_chars = max_prompt_chars(limits.max_model_len,
                                                 tokenizer.backend.get_vocab(with_added_tokens=True))

    async def completion(self, body: CompletionRequest, rid: str, timeout_header: str | None) -> Admitted:
        timeout_s = self._openai_fields(body, timeout_header, logprobs=body.logprobs)
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        choices = self._choices(body, max_tokens, body.logprobs is not None, "max_tokens")
        prompts = body.prompts()
        if not prompts:
            raise refusal.invalid("prompt", "prompt must not be empty")
        _check(CHOICES, len(prompts) * body.n, "n", "prompts × n")  # before tokenizing any of them
        prompt_ids = [await self._prompt_ids(p, "prompt") for p in prompts]
        jobs = [(ids, params) for ids in prompt_ids for params in choices]
        return self._admit(rid, jobs, sum(map(len, prompt_ids)), timeout_s, "prompt")

    async def chat(self, body: ChatCompletionRequest, rid: str, timeout_header: str | None) -> Admitted:
        timeout_s = self._openai_fields(body, timeout_header, top_logprobs=body.top_logprobs)
        _check(MESSAGES, len(body.messages), "messages")
        if body.max_tokens is not None:  # deprecated, but still a field: in bounds even when overridden
            _check(MAX_TOKENS, body.max_tokens, "max_tokens")
        requested = body.requested_max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        # Without max_tokens the choices get the rest of the context, known once the prompt is.
        choices = self._choices(body, 1 if requested is None else requested, body.logprobs, param)
        self._check_prompt_chars(body.num_content_chars(), "messages")
        try:
            prompt_ids = tuple(await asyncio.to_thread(self.tokenizer.encode_chat, body.message_dicts()))
        except ChatTemplateError as exc:
            raise refusal.invalid("messages", str(exc)) from None
        if requested is None:
            rest = max(self.limits.max_model_len - len(prompt_ids), 1)
            choices = [dataclasses.replace(params, max_tokens=rest) for params in choices]
        jobs = [(prompt_ids, params) for params in choices]
        return self._admit(rid, jobs, len(prompt_ids), timeout_s, "messages")

    async def generate(self, request: pb.GenerateRequest | MalformedMessage, request_id: str,
                       timeout_header: str | None) -> GenerationRequest:
        check_parsed(request)
        if request.ByteSize() > self.limits.max_request_bytes:  # the HTTP body limit, for the same work
            raise refusal.too_large(self.limits.max_request_bytes)
        if request.model:  # empty: the served model
            self.check_model(request.model)
        timeout_s = self.timeout_s(timeout_header)
        params = self._sampling(grpc_sampling_values(request.sampling), "max_tokens")
        which = request.WhichOneof("prompt")
        if which is None:
            raise refusal.invalid("prompt", "prompt must be set: text or token_ids")
        prompt = request.text if which == "text" else list(request.token_ids.ids)
        prompt_ids = await self._prompt_ids(prompt, "prompt")
        self._check_context(len(prompt_ids), params.max_tokens, "prompt")
        return GenerationRequest(request_id, prompt_ids, params, time.time(), timeout_s)

    def check_model(self, model: str) -> None:
        if model != self.limits.model_name:
            raise refusal.unknown_model(model, self.limits.model_name)

    def timeout_s(self, header: str | None) -> float | None:
        """This request's time budget: the server's, or shorter with `X-Request-Timeout` (the
        header over HTTP, the metadata `x-request-timeout` over gRPC)."""
        try:
            client_s = None if header is None else parse_timeout(header)
        except ValueError as exc:
            raise refusal.invalid(REQUEST_TIMEOUT_HEADER, str(exc)) from None
        return effective_timeout(self.limits.request_timeout_s, client_s)

    def _openai_fields(self, body: SamplingFields, timeout_header: str | None,
                       **counts: int | None) -> float | None:
        """The model and the deadline header (as for gRPC), then what only an OpenAI body has: n,
        the endpoint's logprobs `counts`, fields we do not implement. Its time budget."""
        self.check_model(body.model)
        timeout_s = self.timeout_s(timeout_header)
        for name, value in {"n": body.n, **counts}.items():
            if value is not None:
                _check(OPENAI_BOUNDS[name], value, name)
        unsupported = body.unsupported_field()
        if unsupported is not None:
            raise refusal.unsupported(unsupported)
        return timeout_s

    def _choices(self, body: SamplingFields, max_tokens: int, logprobs: bool,
                 max_tokens_param: str) -> list[SamplingParams]:
        return [self._sampling(body.sampling_values(max_tokens=max_tokens, logprobs=logprobs, choice=c),
                               max_tokens_param)
                for c in range(body.n)]

    def _sampling(self, values: Mapping[str, Any], max_tokens_param: str) -> SamplingParams:
        """`SamplingParams(**values)` within the limits; `max_tokens_param` is what the request calls
        max_tokens (chat: maybe max_completion_tokens)."""
        for name, bound in SAMPLING_BOUNDS.items():
            param = max_tokens_param if name == "max_tokens" else name
            if name in values:
                _check(bound, values[name], param)
        stop = values["stop"]
        stops = [stop] if isinstance(stop, str) else list(stop)
        _check(STOP, len(stops), "stop")
        for s in stops:
            _check(STOP_CHARS, len(s), "stop", "each stop string")
        _check(STOP_TOKEN_IDS, len(values["stop_token_ids"]), "stop_token_ids")
        for token_id in values["stop_token_ids"]:
            _check(TOKEN_ID, token_id, "stop_token_ids")
        try:
            return SamplingParams(**values)
        except SamplingParamsError as exc:
            param = max_tokens_param if exc.field == "max_tokens" else exc.field
            raise refusal.invalid(param, str(exc).replace("max_tokens", param, 1)) from None

    async def _prompt_ids(self, prompt: Prompt, param: str) -> tuple[int, ...]:
        if isinstance(prompt, str):
            self._check_prompt_chars(len(prompt), param)
            ids = tuple(await asyncio.to_thread(self.tokenizer.encode, prompt))
        else:
            ids = tuple(prompt)
            bad = next((t for t in ids if not 0 <= t < self.limits.vocab_size), None)
            if bad is not None:
                raise refusal.outside_vocabulary(bad, self.limits.vocab_size, param)
        if not ids:
            raise refusal.invalid(param, f"{param} must not be empty")
        return ids

    def _check_prompt_chars(self, num_chars: int, param: str) -> None:
        """Refuses text too long to fit in the context before it is tokenized (request_limits.py)."""
        if num_chars > self.max_prompt_chars:
            raise refusal.prompt_too_long(self.limits.max_model_len, num_chars, self.max_prompt_chars, param)

    def _check_context(self, num_prompt_tokens: int, max_tokens: int, param: str) -> None:
        if num_prompt_tokens + max_tokens > self.limits.max_model_len:
            raise refusal.context_length_exceeded(self.limits.max_model_len, num_prompt_tokens, max_tokens,
                                                  param)

    def _admit(self, rid: str, jobs: Sequence[tuple[tuple[int, ...], SamplingParams]], num_prompt_tokens: int,
               timeout_s: float | None, param: str) -> Admitted:
        """Engine requests `{rid}-{choice}` for (prompt ids, params) pairs in choice order."""
        for prompt_ids, params in jobs:
            self._check_context(len(prompt_ids), params.max_tokens, param)
        arrival = time.time()
        requests = tuple(GenerationRequest(f"{rid}-{index}", prompt_ids, params, arrival, timeout_s)
                         for index, (prompt_ids, params) in enumerate(jobs))
        return Admitted(requests, num_prompt_tokens)


def grpc_sampling_values(msg: pb.SamplingParams) -> dict[str, Any]:
    """The `SamplingParams` fields of a gRPC `moe_serve.v1.SamplingParams`: unset optional ones
    take the dataclass defaults (max_tokens 16, temperature 1, ...)."""
    set_fields = {name: getattr(msg, name) for name in OPTIONAL_GRPC_SAMPLING_FIELDS if msg.HasField(name)}
    return set_fields | {"stop": tuple(msg.stop), "stop_token_ids": tuple(msg.stop_token_ids),
                         "ignore_eos": msg.ignore_eos, "logprobs": msg.logprobs}


def _check(bound: Bound, value: float, field: str, label: str | None = None) -> None:
    if not bound.holds(value):
        raise refusal.out_of_bounds(field, bound, value, label)
