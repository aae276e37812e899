"""The request handle (cluster/request_handle.py): outputs in order, a timeout that keeps the request."""

from __future__ import annotations

import asyncio

import pytest

from cluster.request_handle import RequestHandle
from cluster.request_output import RequestOutput


def output(token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id="r", token_ids=(token,), text=str(token), logprobs=(None,),
                         num_prompt_tokens=3, num_output_tokens=1, finished=finished,
                         finish_reason="length" if finished else None)


def test_iterates_in_order_and_ends_after_the_finished_output():
    async def main():
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        for out in (output(5), output(6), output(7, finished=True)):
            queue.put_nowait(out)
        handle = RequestHandle("r", queue)
        return handle, [out.token_ids[0] async for out in handle]

    handle, tokens = asyncio.run(main())
    assert tokens == [5, 6, 7] and handle.finished and handle.request_id == "r"


def test_a_timeout_leaves_the_request_readable():
    async def main():
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        handle = RequestHandle("r", queue)
        with pytest.raises(TimeoutError):
            await handle.next_output(timeout_s=0.01)
        queue.put_nowait(output(9, finished=True))
        last = await handle.next_output(timeout_s=None)
        with pytest.raises(RuntimeError, match="has finished"):
            await handle.next_output()
        return last

    assert asyncio.run(main()).token_ids == (9,)
