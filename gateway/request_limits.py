"""How much one request may ask for, checked in the ingress before any work is allocated.

The body limit (`IngressOptions.max_body_bytes`, default 1 MiB, 413) bounds everything that
follows: JSON parsing, validation and tokenizing a text prompt. The rest are counts the request
schema (gateway/protocol.py) or the ingress checks before the engine is called:

- `n` ≤ MAX_N, and prompts × n ≤ MAX_CHOICES (checked before any prompt is tokenized);
- `stop`: at most MAX_STOP strings of at most MAX_STOP_CHARS characters each;
- `stop_token_ids`: at most MAX_STOP_TOKEN_IDS;
- `messages`: at most MAX_MESSAGES;
- integers (`max_tokens`, `top_k`, token ids) at most MAX_INT32, so a 4,000-digit number is a
  short schema error rather than a long one; `seed` in the range torch accepts;
- prompt length: prompt tokens + `max_tokens` ≤ the model's context (`max_model_len`), which also
  caps `max_tokens`; token-id prompts are checked against the vocabulary before anything else,
  and text longer than `max_prompt_chars` (it cannot fit) is refused before it is tokenized.

gRPC applies the same stop limits and prompt-length checks, and refuses a request message larger
than the body limit.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_MAX_BODY_BYTES = 1 << 20  # IngressOptions.max_body_bytes: HTTP bodies, gRPC request messages
MAX_N = 8  # choices per prompt
MAX_CHOICES = 64  # prompts × n per request: one request may not flood the engine
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string: the stop checker scans each one every step
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 512  # chat messages per request: rendering the template is linear in them
MAX_INT32 = 2**31 - 1  # token counts and ids are int32 on the gRPC side too


def max_prompt_chars(max_model_len: int, vocab: Iterable[str]) -> int:
    """The most characters a text prompt can have and still fit in the context.

    No token covers more characters than the longest string in the vocabulary (byte-level
    vocabularies spell each byte as one character, so a token's string is never shorter than the
    text it stands for): a longer text has more than `max_model_len` tokens and is refused
    without tokenizing it, which for a 1 MiB prompt would hold the ingress for seconds.
    """
    return max_model_len * max(map(len, vocab), default=1)
