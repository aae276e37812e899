"""How much one request may ask for: the limits the front door (gateway/front_door.py) checks, for
HTTP and gRPC alike, before any work is allocated.

The body limit (`IngressOptions.max_body_bytes`, default 1 MiB) bounds everything that follows:
parsing, validation and tokenizing a text prompt (HTTP: 413 while the body arrives; gRPC: the
request message's size). The rest, in the order the front door checks them:

- `model`: the served one (gRPC: empty means it);
- `n` in [1, MAX_N] and prompts × n ≤ MAX_CHOICES (HTTP; before any prompt is tokenized);
- `max_tokens` and `top_k` at most MAX_INT32 (so a 4,000-digit number is a short refusal),
  `temperature` in OpenAI's [0, 2];
- `stop`: at most MAX_STOP strings of 1 to MAX_STOP_CHARS characters each;
- `stop_token_ids`: at most MAX_STOP_TOKEN_IDS, each in [0, MAX_INT32];
- `messages`: 1 to MAX_MESSAGES (chat);
- the prompt: not empty; token ids below the vocabulary size; text no longer than
  `max_prompt_chars` (it cannot fit: refused before it is tokenized); prompt tokens +
  `max_tokens` ≤ the model's context (`max_model_len`), which also caps `max_tokens`.

The rules sampling itself owns (top_p in (0, 1], min_p in [0, 1], the seed range torch accepts)
are `SamplingParams`' (workers/model/sampling_params.py); the front door reports them the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 1 << 20  # IngressOptions.max_body_bytes: HTTP bodies, gRPC request messages
MAX_N = 8  # choices per prompt
MAX_CHOICES = 64  # prompts × n per request: one request may not flood the engine
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string: the stop checker scans each one every step
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 512  # chat messages per request: rendering the template is linear in them
MAX_INT32 = 2**31 - 1  # token counts and ids are int32 on the gRPC side too


@dataclass(frozen=True)
class Bound:
    """An inclusive range for a value or, with `unit`, for how many items (or characters) a field
    holds. The front door checks it; the OpenAPI document declares it (`json_schema`)."""

    low: int | float
    high: int | float
    unit: str | None = None  # "strings", "characters", ...: a count of them

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high  # never for NaN

    @property
    def rule(self) -> str:
        if self.unit is None:
            return f"must be in [{self.low}, {self.high}]"
        if self.low == 0:
            return f"must have at most {self.high} {self.unit}"
        return f"must have {self.low} to {self.high} {self.unit}"

    def json_schema(self) -> dict[str, int | float]:
        if self.unit is None:
            keys = ("minimum", "maximum")
        elif self.unit == "characters":
            keys = ("minLength", "maxLength")
        else:
            keys = ("minItems", "maxItems")
        return dict(zip(keys, (self.low, self.high), strict=True))


TEMPERATURE = Bound(0, 2)  # OpenAI's range
MAX_TOKENS = Bound(1, MAX_INT32)
TOP_K = Bound(-1, MAX_INT32)  # -1 or 0 is off
N = Bound(1, MAX_N)
CHOICES = Bound(1, MAX_CHOICES)  # prompts × n
STOP = Bound(0, MAX_STOP, "strings")
STOP_CHARS = Bound(1, MAX_STOP_CHARS, "characters")
STOP_TOKEN_IDS = Bound(0, MAX_STOP_TOKEN_IDS, "ids")
TOKEN_ID = Bound(0, MAX_INT32)  # a stop token id (prompt token ids are checked against the vocabulary)
MESSAGES = Bound(1, MAX_MESSAGES, "messages")
LOGPROBS = Bound(0, 5)  # /v1/completions' `logprobs` (OpenAI's); only 0 is implemented
TOP_LOGPROBS = Bound(0, 20)  # /v1/chat/completions' `top_logprobs` (OpenAI's); only 0 is implemented
# Sampling values with a bound of their own, beyond what SamplingParams checks.
SAMPLING_BOUNDS = {"max_tokens": MAX_TOKENS, "temperature": TEMPERATURE, "top_k": TOP_K}
# Counts only an OpenAI body has.
OPENAI_BOUNDS = {"n": N, "logprobs": LOGPROBS, "top_logprobs": TOP_LOGPROBS}


def max_prompt_chars(max_model_len: int, vocab: Iterable[str]) -> int:
    """The most characters a text prompt can have and still fit in the context.

    No token covers more characters than the longest string in the vocabulary (byte-level
    vocabularies spell each byte as one character, so a token's string is never shorter than the
    text it stands for): a longer text has more than `max_model_len` tokens and is refused
    without tokenizing it, which for a 1 MiB prompt would hold the ingress for seconds.
    """
    return max_model_len * max(map(len, vocab), default=1)
