"""The OpenAI wire format: request and response bodies of /v1/completions, /v1/chat/completions
and /v1/models, as pydantic models.

Requests are strict about types (no "1" for 1, no 1.0 for an integer, no 1 for true) and, like
OpenAI, ignore top-level fields they do not know. NaN and infinities are not numbers here, and
strings must be encodable as UTF-8 (JSON's `\ud800` escape can smuggle in a lone surrogate that
the tokenizer chokes on). Values are the front door's to check (gateway/front_door.py): the
limits of gateway/request_limits.py, which apply to gRPC requests too, are declared here only
for the OpenAPI document. Fields OpenAI defines but we do not implement (penalties, logit bias,
echo, suffix, best_of, top alternatives in logprobs, tools) are accepted at their neutral value
and refused otherwise (`unsupported_field`), so a client never gets an answer to a question it
did not ask.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.request_limits import (
    LOGPROBS,
    MAX_TOKENS,
    MESSAGES,
    STOP,
    STOP_CHARS,
    STOP_TOKEN_IDS,
    TEMPERATURE,
    TOKEN_ID,
    TOP_K,
    TOP_LOGPROBS,
    Bound,
    N,
)
from workers.model.sampling_params import MAX_SEED, MIN_SEED

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

Prompt = str | list[int]  # one prompt: text, or token ids used as given


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unicode(text: str) -> str:
    if not _is_unicode(text):
        raise ValueError("must be valid Unicode text (a lone surrogate escape is not)")
    return text


def declared(bound: Bound, default: Any = None) -> Any:
    """A field whose `bound` the OpenAPI document declares; the front door enforces it."""
    return Field(default, json_schema_extra=bound.json_schema())


Text = Annotated[str, AfterValidator(_unicode)]
StopString = Annotated[str, Field(json_schema_extra=STOP_CHARS.json_schema()), AfterValidator(_unicode)]
TokenId = Annotated[int, Field(json_schema_extra=TOKEN_ID.json_schema())]


class _StrictRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_StrictRequest):
    include_usage: bool = False


class SamplingFields(_StrictRequest):
    """Fields both endpoints share; `null` means "the default" throughout, as with OpenAI."""

    model: Text
    temperature: float | None = declared(TEMPERATURE)
    top_p: float | None = None
    top_k: int | None = declared(TOP_K)  # vLLM's extension: -1 or 0 is off
    min_p: float | None = None  # vLLM's extension
    seed: int | None = Field(None, json_schema_extra={"minimum": MIN_SEED, "maximum": MAX_SEED})
    stop: StopString | list[StopString] | None = declared(STOP)
    stop_token_ids: list[TokenId] | None = declared(STOP_TOKEN_IDS)  # vLLM's extension
    n: int = declared(N, 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: Text | None = None  # accepted and ignored

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def unsupported_field(self) -> str | None:
        """The first field set to something we do not implement, or None."""
        if self.presence_penalty:
            return "presence_penalty"
        if self.frequency_penalty:
            return "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        if self.stream_options is not None and not self.stream:
            return "stream_options"
        return None

    def sampling_values(self, *, max_tokens: int, logprobs: bool, choice: int = 0) -> dict[str, Any]:
        """The `SamplingParams` fields of one choice: the fields this request sets (null: the
        default) and the ones the endpoint decides; the front door checks and builds them.

        Each of the n choices gets its own seed (seed + choice, wrapped into range): with one seed
        for all, n > 1 would return n copies of the same text.
        """
        seed = self.seed
        if seed is not None and choice and MIN_SEED <= seed <= MAX_SEED:
            seed = MIN_SEED + (seed + choice - MIN_SEED) % (MAX_SEED - MIN_SEED + 1)
        optional = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                    "min_p": self.min_p, "seed": seed}
        return {name: value for name, value in optional.items() if value is not None} | {
            "max_tokens": max_tokens, "stop": () if self.stop is None else self.stop,
            "stop_token_ids": self.stop_token_ids or (),
            "ignore_eos": self.ignore_eos, "logprobs": logprobs}


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = declared(MAX_TOKENS)  # None: DEFAULT_COMPLETION_MAX_TOKENS
    logprobs: int | None = declared(LOGPROBS)  # only 0 (the sampled token's) is implemented
    echo: bool = False
    suffix: Text | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list "
                             "of token-id lists; strings valid Unicode") from None

    def prompts(self) -> list[Prompt]:
        """The prompts, one per entry ([] for an empty list: the front door refuses it)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [p]  # one token-id prompt
        return list(p)

    def unsupported_field(self) -> str | None:
        if self.logprobs:
            return "logprobs"  # top alternatives are not computed; logprobs=0 gives the sampled token's
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        return super().unsupported_field()


class TextContentPart(_StrictRequest):
    type: Literal["text"]
    text: Text


class ChatMessage(_StrictRequest):
    role: Text
    content: Text | list[TextContentPart]
    name: Text | None = None  # accepted and ignored


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = declared(MESSAGES, ...)
    # max_tokens is deprecated by OpenAI in favour of max_completion_tokens; None (both): the rest
    # of the context.
    max_tokens: int | None = declared(MAX_TOKENS)
    max_completion_tokens: int | None = declared(MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = declared(TOP_LOGPROBS)  # only 0 is implemented
    tools: list[Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported_field(self) -> str | None:
        if self.top_logprobs:
            return "top_logprobs"
        if self.tools:
            return "tools"
        return super().unsupported_field()

    def num_content_chars(self) -> int:
        """Characters of message text: the rendered prompt has at least these."""
        return sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content)
                   for m in self.messages)

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


# -- responses ----------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and (with `usage` None but on the last one) each streamed chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-serve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error's body (gateway/errors.py); declared in the OpenAPI document."""

    error: ErrorDetail
