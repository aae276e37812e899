"""A Ray ObjectRef as a coroutine, so asyncio can wait on, time out and cancel it."""

from __future__ import annotations


async def awaited(ref):
    return await ref
