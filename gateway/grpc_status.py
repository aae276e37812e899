"""A refusal as gRPC renders it: a status code and the refusal's message as details.

The HTTP layer renders the same kinds as status codes and OpenAI's error body (gateway/errors.py).
"""

from __future__ import annotations

import grpc
from ray.serve.grpc_util import RayServegRPCContext

from gateway.refusal import Kind, Refusal

GRPC_STATUS = {
    Kind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.UNSUPPORTED: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.CONTEXT_LENGTH: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.UNKNOWN_MODEL: grpc.StatusCode.NOT_FOUND,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
}


class GrpcError(Exception):
    """Ends a call with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    def __reduce__(self):
        # A stream's GrpcError travels to the proxy (wrapped by Serve) and must unpickle there.
        return type(self), (self.code, self.details)

    def set_on(self, grpc_context: RayServegRPCContext) -> None:
        grpc_context.set_code(self.code)
        grpc_context.set_details(self.details)


def grpc_error(refusal: Refusal) -> GrpcError:
    return GrpcError(GRPC_STATUS[refusal.kind], refusal.message)
