"""ASGI middleware: 413 for a request body over the limit, whether its length is declared or not."""

from __future__ import annotations

from gateway import errors


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
            await errors.payload_too_large(self.max_bytes).response()(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await errors.payload_too_large(self.max_bytes).response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
