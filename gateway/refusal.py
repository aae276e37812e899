"""Why a request is not served, said once for HTTP and gRPC: a kind, a message and the field.

The front door (gateway/front_door.py) refuses bad requests and the engine's failures are
classified into the same kinds (gateway/engine_failures.py); each protocol only renders a kind:
HTTP as a status code and OpenAI's error body (gateway/errors.py), gRPC as a status code and
details (gateway/grpc_status.py). So a request refused over one protocol gets the same message
over the other.

Messages stay small whatever the request was: a message is cut at MAX_MESSAGE_CHARS, and a value
taken from the request (a model name, a stop string, a number) at MAX_ECHO_CHARS, so a refusal
never reflects a large input back (log and proxy bloat, reflected content).
"""

from __future__ import annotations

import re
from enum import Enum

from gateway.request_limits import Bound

MAX_MESSAGE_CHARS = 512
MAX_ECHO_CHARS = 48
_GOT = re.compile(r"[,;] got ")  # where our validators' messages start quoting the bad value


class Kind(Enum):
    """What is wrong, whichever protocol the request came by."""

    INVALID = "invalid"  # a field's value, a count or a size limit (400 / INVALID_ARGUMENT)
    UNSUPPORTED = "unsupported"  # a field set to a value this server does not implement
    CONTEXT_LENGTH = "context_length"  # the prompt (and max_tokens) cannot fit in the context
    TOO_LARGE = "too_large"  # the request is over the size limit
    UNKNOWN_MODEL = "unknown_model"  # a model this server does not serve
    UNAUTHENTICATED = "unauthenticated"  # the API key is missing or wrong
    OVERLOADED = "overloaded"  # a queue in front of the engine is full: retry later
    UNAVAILABLE = "unavailable"  # the engine is down, draining, or failed the request
    DEADLINE = "deadline"  # the request's time budget ran out
    INTERNAL = "internal"  # a bug: nothing the client can change


class Refusal(Exception):
    """A request the server does not serve: raised by the front door and the engine stream,
    rendered by the protocol layer."""

    def __init__(self, kind: Kind, message: str, field: str | None = None) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field  # the request field to blame (HTTP's `param`), or None

    def __reduce__(self):
        return type(self), (self.kind, self.message, self.field)


def clip(text: str, max_chars: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `max_chars` (marked with "…"); for anything that came from the request."""
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def clip_value(message: str) -> str:
    """A "<rule>, got <value>" message (SamplingParams, the tokenizer) with the value clipped."""
    match = _GOT.search(message)
    return message[: match.end()] + clip(message[match.end():]) if match else message


# -- the refusals, one message each ---------------------------------------------------------------


def invalid(field: str | None, message: str) -> Refusal:
    return Refusal(Kind.INVALID, clip_value(message), field)


def out_of_bounds(field: str, bound: Bound, value: object, label: str | None = None) -> Refusal:
    """`value` (a field's, or with a `bound.unit` its count) outside `bound`; `label` names it
    where the field's name alone would not ("prompts × n")."""
    return invalid(field, f"{label or field} {bound.rule}, got {value!r}")


def unsupported(field: str) -> Refusal:
    return Refusal(Kind.UNSUPPORTED, f"{field} is not supported by this server with that value", field)


def unknown_model(model: str, served: str) -> Refusal:
    return Refusal(Kind.UNKNOWN_MODEL,
                   f"The model `{clip(model)}` does not exist. This server serves `{clip(served)}`.", "model")


def outside_vocabulary(token_id: int, vocab_size: int, field: str) -> Refusal:
    return invalid(field, f"token id {clip(str(token_id))} is outside the vocabulary [0, {vocab_size})")


def context_length_exceeded(max_model_len: int, num_prompt_tokens: int, max_tokens: int,
                            field: str) -> Refusal:
    return Refusal(
        Kind.CONTEXT_LENGTH,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {field}, {max_tokens} in "
        f"the completion). Please reduce the length of the {field} or completion.",
        field,
    )


def prompt_too_long(max_model_len: int, num_chars: int, max_chars: int, field: str) -> Refusal:
    return Refusal(
        Kind.CONTEXT_LENGTH,
        f"This model's maximum context length is {max_model_len} tokens. However, the {field} has "
        f"{num_chars} characters, more than that many tokens can hold ({max_chars}). Please reduce "
        f"the length of the {field}.",
        field,
    )


def too_large(max_bytes: int) -> Refusal:
    return Refusal(Kind.TOO_LARGE, f"The request is larger than the limit of {max_bytes} bytes.")


def unauthenticated() -> Refusal:
    # The key itself is never echoed (OpenAI echoes a masked one; we echo nothing).
    return Refusal(Kind.UNAUTHENTICATED, "Incorrect or missing API key: send 'authorization: Bearer <key>' "
                                         "(an HTTP header, or gRPC metadata).")


def internal_error(exc: BaseException) -> Refusal:
    return Refusal(Kind.INTERNAL, f"Internal server error ({type(exc).__name__}).")
