"""Running background work (a placement's weight loads and restacking) below the step's priority.

A worker's step loop and the loads for a coming placement share the node's cores; where they
compete (more workers than cores, or a host busy with data loading), the loads must give way
or every step slows while they run. So they run in a thread of their own whose OS scheduling
priority is the lowest (Linux `nice` 19 applies per thread); the step threads keep theirs.
Elsewhere the thread simply runs at normal priority.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
LOWEST = 19


def run_at_low_priority(fn: Callable[[], T]) -> T:
    """`fn()` in a fresh thread at the lowest priority; its result, or its exception re-raised."""
    out: dict[str, object] = {}

    def body() -> None:
        try:
            if hasattr(os, "setpriority"):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST)
            out["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=body, name="low-priority", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["result"]  # type: ignore[return-value]
