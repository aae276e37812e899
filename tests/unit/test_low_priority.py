"""Background work of a worker runs in a thread of the lowest priority (workers/group/low_priority.py)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from workers.group.low_priority import LOWEST, run_at_low_priority


def test_the_work_runs_elsewhere_at_the_lowest_priority_and_the_caller_keeps_its_own():
    caller = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, caller)

    def work():
        me = threading.get_native_id()
        return me, os.getpriority(os.PRIO_PROCESS, me)

    tid, nice = run_at_low_priority(work)
    assert tid != caller
    if sys.platform.startswith("linux"):
        assert nice == LOWEST
    assert os.getpriority(os.PRIO_PROCESS, caller) == before


def test_errors_reach_the_caller():
    def fails():
        raise MemoryError("no room for the new copies")

    with pytest.raises(MemoryError, match="no room"):
        run_at_low_priority(fails)
