"""The API key check HTTP and gRPC share: `authorization: Bearer <key>`, constant-time; a request
without it is refused with the same message over both (gateway/refusal.py: `unauthenticated`).

HTTP checks it in an ASGI middleware, outside everything else, rather than as a route
dependency: a request without the key is answered 401 before its body is read or parsed and
before routing, so an unauthenticated client reaches no parser, learns no route (an unknown
path is 401 too, not 404) and gets no API document. Only the probes are open (OPEN_PATHS):
load balancers and Kubernetes probes carry no key, and they reveal only up/ready.
"""

from __future__ import annotations

import hmac

from gateway import errors
from gateway.refusal import unauthenticated

OPEN_PATHS = frozenset({"/health", "/ready"})


def bearer_key_matches(authorization: str | None, api_key: str | None) -> bool:
    """True when no key is configured, or the header carries exactly that key.

    hmac.compare_digest takes time independent of where the strings differ, so response
    timing does not leak the key; the key itself is never logged or echoed.
    """
    if api_key is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def route_path(scope) -> str:
    """The path inside the app: Serve mounts an app under its route prefix as `root_path`."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


class BearerAuthMiddleware:
    """401 (OpenAI's `invalid_api_key` body) for every request but OPEN_PATHS without the key."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send) -> None:
        if (self.api_key is None or scope["type"] not in ("http", "websocket")
                or route_path(scope) in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        # latin-1: ASGI header bytes may be anything; a non-ASCII "key" simply does not match.
        authorization = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        if bearer_key_matches(authorization, self.api_key):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
        else:
            await errors.api_error(unauthenticated()).response()(scope, receive, send)
