"""ASGI middleware: 413 for a request body over the limit, whether its length is declared or not
(gRPC refuses a request message over the same limit, with the same message: gateway/front_door.py)."""

from __future__ import annotations

from gateway import errors
from gateway.refusal import too_large


class BodyLimitMiddleware:
    """The body is read (up to the limit) before the app runs, then replayed: the Serve proxy has
    buffered it already, so this costs no latency and no more memory than the limit."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await errors.api_error(too_large(self.max_bytes)).response()(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await errors.api_error(too_large(self.max_bytes)).response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
