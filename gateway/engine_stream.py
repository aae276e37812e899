"""One engine request's outputs through a Serve handle, shared by the HTTP and gRPC ingress.

Leaving early (client gone, call cancelled) cancels the replica-side generator, which aborts
the sequence and frees its KV blocks; an explicit abort follows in case the cancel raced
admission. Each protocol maps the failures to its own status codes.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator

from cluster.request_output import RequestOutput
from gateway.generation_request import GenerationRequest


class EngineFailed(Exception):
    """The engine ended the request with an error output (e.g. an unrecoverable step failure)."""


async def engine_outputs(engine, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
    """Stream `request`'s outputs from the engine deployment handle `engine`.

    Raises EngineFailed for an error output; errors of the handle itself pass through.
    Close it with `contextlib.aclosing` so an early exit aborts at once.
    """
    response = engine.options(stream=True).generate.remote(request)
    finished = False
    try:
        async for out in response:
            if out.finish_reason == "error":
                raise EngineFailed(out.error or "the engine failed the request")
            finished = out.finished
            yield out
    finally:
        if not finished:
            response.cancel()
            # From an empty context: Serve cancels the calls a request makes while it is being
            # cancelled, and that is exactly when this runs.
            contextvars.Context().run(engine.abort.remote, request.request_id)
