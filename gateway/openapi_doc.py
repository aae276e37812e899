"""The OpenAPI document at /openapi.json, telling the truth about errors.

FastAPI documents a 422 with its own validation body for every route that takes input, while
we answer 400 with OpenAI's error body (gateway/errors.py) and have more statuses than that:
`error_responses` swaps 422 for the statuses each route really has, all with `ErrorResponse`,
declares that successful generation may also be an SSE stream, and, when a key is set, the
bearer scheme (every operation but the probes). Tools that trust the document (schemathesis,
client generators) then check and generate against what the server does.
"""

from __future__ import annotations

import copy

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.auth import OPEN_PATHS
from gateway.protocol import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
DESCRIPTIONS = {
    "400": "Malformed JSON, a wrong type, an out-of-range value or a limit exceeded",
    "401": "Missing or wrong API key",
    "404": "Another model name",
    "408": "The request's deadline passed",
    "413": "The body is over the limit",
    "429": "Overloaded: retry after `Retry-After` seconds",
    "503": "The engine is unavailable: retry after `Retry-After` seconds",
}
GENERATION = ("400", "404", "408", "413", "429", "503")  # POST /v1/completions, /v1/chat/completions
ROUTE_ERRORS = {"/v1/models/{model_id}": ("404",), "/ready": ("503",)}


def install_openapi(app: FastAPI, *, api_key_required: bool) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            app.openapi_schema = error_responses(schema, api_key_required=api_key_required)
        return app.openapi_schema

    app.openapi = openapi


def error_responses(schema: dict, *, api_key_required: bool) -> dict:
    """`schema` (FastAPI's document) with our error statuses instead of 422."""
    schema = copy.deepcopy(schema)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    if api_key_required:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearerAuth": []}]
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            statuses = GENERATION if method == "post" else ROUTE_ERRORS.get(path, ())
            if method == "post":
                ok = responses.get("200", {}).setdefault("content", {})
                ok["text/event-stream"] = {"schema": {"type": "string"}}  # when `stream` is true
            if path in OPEN_PATHS:
                op["security"] = []
            elif api_key_required:
                statuses = ("401", *statuses)
            for status in statuses:
                responses[status] = {"description": DESCRIPTIONS[status],
                                     "content": {"application/json": {"schema": ERROR_REF}}}
    return schema
