"""A worker's step loop: run every step the engine broadcasts until it closes the channel.

Started by one Ray call at set-up (`GroupMember.serve_steps`), it holds one thread of the
actor for as long as the group serves; the actor's other threads still answer probes, stats
and the Ray-call path's `execute` (cluster/ray_executor.py). A step that raises is reported
back (the engine's fault diagnosis decides what it means) and the loop waits for the next.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from workers.group.step_link import StepLink
from workers.group.step_message import StepFailure, StepMessage

log = logging.getLogger(__name__)


def serve_steps(link: StepLink, run_step: Callable[[StepMessage], object]) -> int:
    """Returns the number of steps served, once the engine closed the channel."""
    num_steps = 0
    try:
        while (frame := link.receive()) is not None:
            seq = frame.seq
            try:
                result = run_step(link.message(frame))
            except Exception as exc:
                log.exception("step %d failed on rank %d", seq, link.route.rank)
                text = " ".join(f"{type(exc).__name__}: {exc}".split())
                link.report(seq, StepFailure(link.route.rank, text, traceback.format_exc()))
                continue
            link.reply(seq, result)
            num_steps += 1
    except OSError:
        # The engine's end is gone (it closed, or its process died): nobody is waiting.
        log.info("rank %d: the step channel closed", link.route.rank)
    finally:
        link.close()
    return num_steps
