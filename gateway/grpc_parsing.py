"""Request bytes that are not a valid protobuf message reach the ingress as `MalformedMessage`.

Serve's gRPC proxy parses each request with the deserializer its servicer adder registered. A
generated adder registers `Message.FromString`, whose DecodeError grpcio turns into status
UNKNOWN with the parser's text, before any of our code runs. `tolerant_adder` wraps a generated
adder (gateway/grpc_stubs.py serves `moe_serve.v1.MoeServe`'s through it) so that it registers
the same handlers with a deserializer that never raises: bytes that do not parse become a
`MalformedMessage`, which the proxy hands to the replica like any request, and the ingress
answers INVALID_ARGUMENT (after the API key check, as for any other request: `check_parsed`).

The client's bytes are only ever parsed by protobuf; the proxy pickles the parsed message (or
this dataclass) to hand it to a replica, a pickle of its own making.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from gateway import refusal


@dataclass(frozen=True)
class MalformedMessage:
    """Request bytes that did not parse as the method's request message."""

    message_type: str  # the full name of the message expected, e.g. "moe_serve.v1.GenerateRequest"
    num_bytes: int

    @property
    def reason(self) -> str:
        return f"the request's {self.num_bytes} bytes are not a valid {self.message_type} message"


def check_parsed(request: object) -> None:
    """Refuses (INVALID_ARGUMENT) request bytes that were no valid message."""
    if isinstance(request, MalformedMessage):
        raise refusal.invalid(None, request.reason)


def tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`parse`, returning a `MalformedMessage` where it would raise."""
    if parse is None:
        return None
    message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "request"

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:  # DecodeError, and anything else a parser may raise on bad bytes
            return MalformedMessage(name, len(raw))

    return deserialize


def _tolerant_handlers(handlers: Mapping[str, grpc.RpcMethodHandler]) -> dict[str, grpc.RpcMethodHandler]:
    return {name: handler._replace(request_deserializer=tolerant(handler.request_deserializer))
            for name, handler in handlers.items()}


class _TolerantServer:
    """The server as a generated adder sees it: handlers go on with tolerant deserializers."""

    def __init__(self, server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        for handler in generic_handlers:
            # grpc's dictionary handler; Serve's own server rewrites the same attribute.
            handler._method_handlers = _tolerant_handlers(handler._method_handlers)
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers) -> None:
        self._server.add_registered_method_handlers(service_name, _tolerant_handlers(method_handlers))


def tolerant_adder(adder: Callable[[Any, Any], None],
                   *also: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """A generated `add_<Service>Servicer_to_server` that registers tolerant deserializers;
    the adders in `also` are registered with it, the same way."""

    def add(servicer, server) -> None:
        for each in (adder, *also):
            each(servicer, _TolerantServer(server))

    add.__name__ = add.__qualname__ = adder.__name__
    add.__doc__ = f"{adder.__name__}, with request bytes that do not parse delivered as MalformedMessage."
    return add
