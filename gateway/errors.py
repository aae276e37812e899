"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` (DESIGN.md §6).

Handlers raise `APIError` (usually through the constructors below); `install_error_handlers`
turns it, FastAPI's validation errors (400, never 422), unknown routes and anything unexpected
into that body, so the official `openai` client maps every status to its exception class
(`BadRequestError`, `AuthenticationError`, `NotFoundError`, ...).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a shed request is told to wait: the queue moves every engine step
# Error bodies stay small whatever the request was: a message is cut at MAX_MESSAGE_CHARS, and a
# value taken from the request (a model name, a stop string, a field name) at MAX_ECHO_CHARS, so
# an error never reflects a large input back (log and proxy bloat, reflected content).
MAX_MESSAGE_CHARS = 512
MAX_ECHO_CHARS = 48
_GOT = re.compile(r"[,;] got ")  # where our validators' messages start quoting the bad value
# pydantic names the member of a union it tried in the location ("str", "list[int]",
# "function-after[...]"): noise to a client, so such parts are left out.
_UNION_TAG = re.compile(r"[\[(<]|^(str|int|float|bool)$")


class APIError(Exception):
    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def clip(text: str, max_chars: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `max_chars` (marked with "…"); for anything that came from the request."""
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def clip_value(message: str) -> str:
    """A "<rule>, got <value>" message (SamplingParams, the tokenizer) with the value clipped."""
    match = _GOT.search(message)
    return message[: match.end()] + clip(message[match.end():]) if match else message


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(max_model_len: int, num_prompt_tokens: int, max_tokens: int,
                            param: str) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} in "
        f"the completion). Please reduce the length of the {param} or completion.",
        param=param, code="context_length_exceeded",
    )


def prompt_too_long(max_model_len: int, num_chars: int, max_chars: int, param: str) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, the {param} has "
        f"{num_chars} characters, more than that many tokens can hold ({max_chars}). Please reduce "
        f"the length of the {param}.",
        param=param, code="context_length_exceeded",
    )


def unauthorized() -> APIError:
    # The key itself is never echoed (OpenAI echoes a masked one; we echo nothing).
    return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                    type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str, served: Sequence[str] = ()) -> APIError:
    """404 for a model name this server does not serve, naming the one(s) it does."""
    names = ", ".join(f"`{clip(name)}`" for name in served)
    hint = f" This server serves {names}." if names else ""
    return APIError(404, f"The model `{clip(model)}` does not exist.{hint}", param="model",
                    code="model_not_found")


def is_json_content_type(value: str | None) -> bool:
    """`application/json` (any parameters) or `application/*+json`. No header (or an empty one)
    counts: FastAPI reads such a body as JSON."""
    if not value:
        return True
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def not_json_content_type(value: str) -> APIError:
    # curl -d sends application/x-www-form-urlencoded unless told otherwise: say what to send.
    return APIError(400, f"The body must be JSON, sent with the header 'Content-Type: application/json'; "
                         f"this request was sent as Content-Type: {clip(value)}.",
                    code="invalid_content_type")


def payload_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"Request body is larger than the limit of {max_bytes} bytes.",
                    code="request_too_large")


def too_many_requests(message: str = "Too many requests; retry later.") -> APIError:
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def service_unavailable(message: str = "The engine is overloaded or unavailable; retry later.") -> APIError:
    return APIError(503, message, type="service_unavailable_error", code="service_unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def request_timeout(message: str = "The request did not finish before its deadline.") -> APIError:
    return APIError(408, message, type="timeout_error", code="timeout")


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """A 400 from pydantic's error list: the first error names `param`, the message lists all."""
    if any(err.get("type") == "json_invalid" for err in errors):
        return invalid_json()
    parts, params = [], []
    for err in errors:
        # A location can hold the client's own dictionary keys (logit_bias): clip every part.
        loc = [clip(str(p)) for p in err.get("loc", ()) if p != "body" and not _UNION_TAG.search(str(p))]
        parts.append(f"{'.'.join(loc) or 'body'}: {_strip_prefix(str(err.get('msg', 'invalid')))}")
        params.append(loc[0] if loc else None)
    message = "; ".join(dict.fromkeys(parts)) or "invalid request"
    return APIError(400, message, param=params[0] if params else None, code="invalid_value")


def invalid_json() -> APIError:
    # The parser's own message would quote the body; the position is not worth an echo either.
    return APIError(400, "We could not parse the JSON body of your request: send one UTF-8 JSON object "
                         "(with 'Content-Type: application/json').", code="invalid_json")


def _strip_prefix(msg: str) -> str:
    # pydantic prefixes messages of ValueErrors raised in validators with "Value error, ".
    return msg.removeprefix("Value error, ")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A body FastAPI did not read as JSON (another Content-Type) fails validation as bytes:
        # the header, not the fields, is what the client has to fix.
        content_type = request.headers.get("content-type")
        if not is_json_content_type(content_type):
            return not_json_content_type(content_type).response()
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400:  # FastAPI's only one: the body is not JSON (bad bytes, too deep)
            return invalid_json().response()
        if exc.status_code == 404:
            message = "Not found: this server offers /v1/completions, /v1/chat/completions, /v1/models, " \
                      "/health and /ready."
        return APIError(exc.status_code, message, type=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in a request handler")
        return APIError(500, f"Internal server error ({type(exc).__name__}).", type="server_error",
                        code="internal_error").response()
