"""A cancelled server-streaming gRPC call always cancels its replica call (and so its sequence).

Serve's gRPC proxy serves each streaming RPC with an async generator that pulls the replica's
stream (`ProxyResponseGenerator`) and yields each message to grpcio. The proxy cancels the
replica call only when the client's cancel reaches it while it waits for the next message; a
cancel that lands while grpcio is writing a message arrives as `GeneratorExit` at the proxy's
`yield`, which its `except BaseException` swallows, and the replica's stream (our ingress, then
the engine) runs on to `max_tokens`. Under load that was most cancels (Ray 2.60).

`cancel_safe_streams` wraps the proxy's handler factory so that every unary-stream handler is
pulled by a task of its own that is never suspended at a `yield` (it hands each message over
through a queue and goes straight back to waiting for the next). When the client goes away the
wrapper cancels that task, the cancel always lands in the proxy's wait, and the proxy cancels the
replica call, which aborts the sequence and frees its KV blocks (gateway/engine_stream.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

_WRAPPED = "_moe_serve_cancel_safe"


def cancel_safe_streams(adder: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """A servicer adder that first makes the server's streaming handlers cancel-safe."""

    def add(servicer, server) -> None:
        _wrap_handler_factory(server)
        adder(servicer, server)

    add.__name__ = add.__qualname__ = getattr(adder, "__name__", "add_servicer")
    add.__doc__ = adder.__doc__
    return add


def _wrap_handler_factory(server) -> None:
    # Serve's gRPC server builds every method's handlers through `service_handler_factory`
    # (ray.serve._private.grpc_util.gRPCGenericServer); a plain grpc server has none: nothing to do.
    factory = getattr(server, "service_handler_factory", None)
    if factory is None or getattr(factory, _WRAPPED, False):
        return

    def wrapped_factory(service_method: str, streaming_type) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        is_server_stream = getattr(streaming_type, "name", "") == "UNARY_STREAM"
        return pulled_by_own_task(handler) if is_server_stream else handler

    setattr(wrapped_factory, _WRAPPED, True)
    server.service_handler_factory = wrapped_factory


_END = object()


class _DetachableContext:
    """The call's context as the pulled handler sees it, until the call is over.

    After the client has gone the handler still runs to its end (the proxy turns the cancel into
    a status and logs the peer); touching a context grpcio has already finished, from a task that
    is not the call's own, crashes the whole proxy (SIGSEGV in `peer()`: "Socket closed" for every
    client). Once detached, what the proxy reads comes from a copy taken while the call was live,
    and everything else does nothing.
    """

    def __init__(self, context) -> None:
        self._context = context
        self._detached = False
        self._peer = context.peer()
        self._metadata = context.invocation_metadata()

    def detach(self) -> None:
        self._detached = True

    def __getattr__(self, name: str):
        if not self._detached:
            return getattr(self._context, name)
        if name == "peer":
            return lambda: self._peer
        if name == "invocation_metadata":
            return lambda: self._metadata
        return lambda *args, **kwargs: None


def pulled_by_own_task(handler: Callable[[Any, Any], AsyncIterator[Any]]):
    """`handler` (a unary-stream handler), run in a task that the client's cancel cancels."""

    async def stream(request, context) -> AsyncIterator[Any]:
        queue: asyncio.Queue = asyncio.Queue()  # unbounded: put_nowait never suspends the pump
        own_context = _DetachableContext(context)

        async def pump() -> None:
            try:
                async for message in handler(request, own_context):
                    queue.put_nowait(message)
            finally:
                queue.put_nowait(_END)

        task = asyncio.ensure_future(pump())
        try:
            while (message := await queue.get()) is not _END:
                yield message
            await task  # the handler's own error, if it raised
        finally:
            if not task.done():
                own_context.detach()
                task.cancel()  # lands in the proxy's wait for the next message: it cancels the replica call

    stream.__name__ = getattr(handler, "__name__", "unary_stream")
    return stream
