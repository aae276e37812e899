"""What a caller holds for one request in the engine: its id and its stream of outputs.

`Engine.add_request` returns one. Each step that produces something for the request puts a
RequestOutput on the handle's queue; the caller reads them in order, either as an async
iterator (it ends after the output marked `finished`) or one at a time with
`next_output(timeout_s)` when it has a deadline to keep. Reading never aborts the request:
call `Engine.abort(handle.request_id)` to give up on it (`Engine.generate` does that when its
iterator is closed early).
"""

from __future__ import annotations

import asyncio

from cluster.request_output import RequestOutput


class RequestHandle:
    def __init__(self, request_id: str, outputs: asyncio.Queue[RequestOutput]) -> None:
        self.request_id = request_id
        self._outputs = outputs  # the engine puts, this handle gets
        self._finished = False

    @property
    def finished(self) -> bool:
        """True once the last output (the one marked `finished`) has been read."""
        return self._finished

    async def next_output(self, timeout_s: float | None = None) -> RequestOutput:
        """The next output. Raises TimeoutError when none comes within `timeout_s` (None: wait as
        long as it takes); the request stays in flight then."""
        if self._finished:
            raise RuntimeError(f"request {self.request_id!r} has finished: there is no next output")
        if timeout_s is None:
            out = await self._outputs.get()
        else:
            out = await asyncio.wait_for(self._outputs.get(), timeout_s)
        self._finished = out.finished
        return out

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        return await self.next_output()
