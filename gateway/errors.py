"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` (DESIGN.md §6).

A refusal (gateway/refusal.py: the front door's, or an engine failure's) is rendered by its kind
through HTTP_STATUS, as gRPC renders it through gateway/grpc_status.py. What only HTTP has (a body
that is not JSON, FastAPI's validation errors: 400, never 422; unknown routes; anything
unexpected) is an `APIError` built here. `install_error_handlers` turns all of them into that
body, so the official `openai` client maps every status to its exception class
(`BadRequestError`, `AuthenticationError`, `NotFoundError`, ...).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.refusal import MAX_MESSAGE_CHARS, Kind, Refusal, clip, internal_error

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a shed request is told to wait: the queue moves every engine step
# pydantic names the member of a union it tried in the location ("str", "list[int]",
# "function-after[...]"): noise to a client, so such parts are left out.
_UNION_TAG = re.compile(r"[\[(<]|^(str|int|float|bool)$")


@dataclass(frozen=True)
class HttpStatus:
    status_code: int
    type: str  # OpenAI's error type
    code: str  # OpenAI's error code
    headers: tuple[tuple[str, str], ...] = ()


_RETRY = (("Retry-After", str(RETRY_AFTER_S)),)
HTTP_STATUS = {
    Kind.INVALID: HttpStatus(400, "invalid_request_error", "invalid_value"),
    Kind.UNSUPPORTED: HttpStatus(400, "invalid_request_error", "unsupported_value"),
    Kind.CONTEXT_LENGTH: HttpStatus(400, "invalid_request_error", "context_length_exceeded"),
    Kind.TOO_LARGE: HttpStatus(413, "invalid_request_error", "request_too_large"),
    Kind.UNKNOWN_MODEL: HttpStatus(404, "invalid_request_error", "model_not_found"),
    Kind.UNAUTHENTICATED: HttpStatus(401, "authentication_error", "invalid_api_key",
                                     (("WWW-Authenticate", "Bearer"),)),
    Kind.OVERLOADED: HttpStatus(429, "rate_limit_error", "rate_limit_exceeded", _RETRY),
    Kind.UNAVAILABLE: HttpStatus(503, "service_unavailable_error", "service_unavailable", _RETRY),
    Kind.DEADLINE: HttpStatus(408, "timeout_error", "timeout"),
    Kind.INTERNAL: HttpStatus(500, "server_error", "internal_error"),
}


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


def api_error(refusal: Refusal) -> APIError:
    """A refusal as HTTP renders it."""
    status = HTTP_STATUS[refusal.kind]
    return APIError(status.status_code, refusal.message, type=status.type, param=refusal.field,
                    code=status.code, headers=dict(status.headers))


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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
    return api_error(Refusal(Kind.INVALID, message, params[0] if params else None))


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

    @app.exception_handler(Refusal)
    async def _refusal(_: Request, exc: Refusal) -> JSONResponse:
        return api_error(exc).response()

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
        return api_error(internal_error(exc)).response()
