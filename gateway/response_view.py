"""Engine outputs → OpenAI response bodies and SSE chunks, one view per endpoint.

A view accumulates the outputs of one HTTP request's choices (for usage and for the whole
response) and renders each new output as a stream chunk. `sse_events` writes a stream as
Server-Sent Events: the chunks, a usage chunk when asked, then `data: [DONE]`; an engine failure
mid-stream becomes an error event (OpenAI's error body) before `[DONE]` (DESIGN.md §5).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

from pydantic import BaseModel

from cluster.request_output import RequestOutput
from cluster.tokenizer import Tokenizer
from gateway.errors import api_error
from gateway.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)
from gateway.refusal import Refusal

DONE = "data: [DONE]\n\n"


class ResponseView:
    def __init__(self, rid: str, created: int, model: str, tokenizer: Tokenizer, *, num_choices: int,
                 num_prompt_tokens: int, logprobs: bool) -> None:
        self.rid = rid
        self.created = created
        self.model = model
        self.tokenizer = tokenizer
        self.num_choices = num_choices
        self.num_prompt_tokens = num_prompt_tokens  # each prompt counted once, whatever n is
        self.logprobs = logprobs
        self.texts: list[list[str]] = [[] for _ in range(num_choices)]
        self.token_ids: list[list[int]] = [[] for _ in range(num_choices)]
        self.token_logprobs: list[list[float | None]] = [[] for _ in range(num_choices)]
        self.finish_reasons: list[str | None] = [None] * num_choices
        self.num_output_tokens = [0] * num_choices

    def add(self, index: int, out: RequestOutput) -> None:
        self.texts[index].append(out.text)
        self.token_ids[index].extend(out.token_ids)
        self.token_logprobs[index].extend(out.logprobs)
        self.num_output_tokens[index] = out.num_output_tokens
        if out.finished:
            self.finish_reasons[index] = out.finish_reason

    def usage(self) -> Usage:
        return Usage.of(self.num_prompt_tokens, sum(self.num_output_tokens))

    def text(self, index: int) -> str:
        return "".join(self.texts[index])

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def should_send(self, out: RequestOutput) -> bool:
        # No text yet (a character held back by the detokenizer) and nothing else to say: skip.
        return bool(out.text) or out.finished or self.logprobs

    # Per endpoint:
    def response(self) -> BaseModel:
        raise NotImplementedError

    def opening_chunks(self) -> list[BaseModel]:
        return []

    def chunk(self, index: int, out: RequestOutput) -> BaseModel | None:
        raise NotImplementedError

    def usage_chunk(self) -> BaseModel:
        raise NotImplementedError


class CompletionView(ResponseView):
    def _logprobs(self, token_ids: Sequence[int], logprobs: Sequence[float | None],
                  offset: int) -> CompletionLogprobs:
        tokens = [self.token_text(t) for t in token_ids]
        offsets, pos = [], offset
        for tok in tokens:
            offsets.append(pos)
            pos += len(tok)
        return CompletionLogprobs(tokens=tokens, token_logprobs=list(logprobs), text_offset=offsets)

    def response(self) -> CompletionResponse:
        choices = [
            CompletionChoice(index=i, text=self.text(i), finish_reason=self.finish_reasons[i],
                             logprobs=self._logprobs(self.token_ids[i], self.token_logprobs[i], 0)
                             if self.logprobs else None)
            for i in range(self.num_choices)
        ]
        return CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=choices,
                                  usage=self.usage())

    def chunk(self, index: int, out: RequestOutput) -> CompletionResponse | None:
        offset = len(self.text(index))
        self.add(index, out)
        if not self.should_send(out):
            return None
        choice = CompletionChoice(
            index=index, text=out.text, finish_reason=out.finish_reason if out.finished else None,
            logprobs=self._logprobs(out.token_ids, out.logprobs, offset) if self.logprobs else None,
        )
        return CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self) -> CompletionResponse:
        return CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=[],
                                  usage=self.usage())


class ChatView(ResponseView):
    def _logprobs(self, token_ids: Sequence[int], logprobs: Sequence[float | None]) -> ChatChoiceLogprobs:
        content = []
        for t, lp in zip(token_ids, logprobs, strict=True):
            text = self.token_text(t)
            content.append(ChatTokenLogprob(token=text, logprob=lp, bytes=list(text.encode())))
        return ChatChoiceLogprobs(content=content)

    def response(self) -> ChatCompletionResponse:
        choices = [
            ChatChoice(index=i, message=ChatResponseMessage(content=self.text(i)),
                       finish_reason=self.finish_reasons[i],
                       logprobs=self._logprobs(self.token_ids[i], self.token_logprobs[i])
                       if self.logprobs else None)
            for i in range(self.num_choices)
        ]
        return ChatCompletionResponse(id=self.rid, created=self.created, model=self.model, choices=choices,
                                      usage=self.usage())

    def opening_chunks(self) -> list[ChatCompletionChunk]:
        # OpenAI opens each choice with the role and an empty content.
        return [self._chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
                for i in range(self.num_choices)]

    def chunk(self, index: int, out: RequestOutput) -> ChatCompletionChunk | None:
        self.add(index, out)
        if not self.should_send(out):
            return None
        return self._chunk(ChatChunkChoice(
            index=index, delta=ChatDelta(content=out.text),
            finish_reason=out.finish_reason if out.finished else None,
            logprobs=self._logprobs(out.token_ids, out.logprobs) if self.logprobs else None,
        ))

    def usage_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[],
                                   usage=self.usage())

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[choice])


async def sse_events(view: ResponseView, outputs: AsyncIterator[tuple[int, RequestOutput]], *,
                     include_usage: bool) -> AsyncIterator[str]:
    """The SSE body of a stream; `outputs` yields (choice index, output) and is closed at the end."""
    try:
        for chunk in view.opening_chunks():
            yield _data(chunk.model_dump(mode="json"))
        async for index, out in outputs:
            chunk = view.chunk(index, out)
            if chunk is not None:
                yield _data(chunk.model_dump(mode="json"))
        if include_usage:
            yield _data(view.usage_chunk().model_dump(mode="json"))
    except Refusal as refused:  # the engine failed after the stream had started
        yield _data(api_error(refused).body())
    finally:
        await outputs.aclose()
    yield DONE


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
