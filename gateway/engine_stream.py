"""One engine request's outputs through a Serve handle, shared by the HTTP and gRPC layers.

Leaving early (client gone, call cancelled) cancels the replica-side generator, which aborts
the sequence and frees its KV blocks; an explicit abort follows in case the cancel raced
admission. Every failure arrives as a `Refusal` (gateway/engine_failures.py), which each
protocol renders as its own status.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator

from cluster.request_output import RequestOutput
from gateway.engine_failures import EngineFailed, classify
from gateway.generation_request import GenerationRequest

log = logging.getLogger(__name__)


async def engine_outputs(engine, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
    """Stream `request`'s outputs from the engine deployment handle `engine`, to the finished one.

    Raises `Refusal` for an error output, a stream that ends before the request finished, and
    any error of the handle. Close it with `contextlib.aclosing` so an early exit aborts at once.
    """
    response = engine.options(stream=True).generate.remote(request)
    finished = False
    try:
        async for out in response:
            if out.finish_reason == "error":
                raise EngineFailed(out.error or "the engine failed the request")
            finished = out.finished
            yield out
        if not finished:
            raise EngineFailed("the engine ended the request without finishing it")
    except Exception as exc:
        raise classify(exc) from exc
    finally:
        if not finished:
            _abort(engine, response, request.request_id)


def _abort(engine, response, request_id: str) -> None:
    """Cancel the replica-side generator and abort the engine request, as far as that goes: a
    request the handle refused (its queue full: the abort call is refused the same way) or whose
    replica died has nothing left to abort, and the abort's own error must not take the place of
    the request's."""
    try:
        response.cancel()
        # From an empty context: Serve cancels the calls a request makes while it is being
        # cancelled, and that is exactly when this runs.
        contextvars.Context().run(engine.abort.remote, request_id)
    except Exception as exc:
        log.debug("could not abort %s: %s", request_id, type(exc).__name__)
