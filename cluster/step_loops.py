"""The model group's step loops: started by Ray calls at set-up, fed by the step broadcast after.

Set-up, per incarnation of the group (at start and after every restart): the engine opens a
`StepBroadcast` (cluster/step_broadcast.py), each worker connects to it (`connect_steps`, a
Ray call that returns once connected), the engine accepts them, then each worker's
`serve_steps` starts its loop on a thread of its actor (workers/group/step_loop.py). That call
never returns while the group serves, and that is what makes it useful: a worker that dies
fails it at once (RayActorError), so every step awaits it beside the results (`ended`).
Closing the broadcast ends every loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import ray

from cluster.ray_await import awaited
from cluster.step_broadcast import StepBroadcast, choose_vias

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT_S = 10.0


class StepLoopEnded(RuntimeError):
    """A worker's step loop returned while the group still served (its channel closed)."""


class StepLoops:
    def __init__(self, broadcast: StepBroadcast, refs: Sequence[ray.ObjectRef]) -> None:
        self.broadcast = broadcast
        self.refs = tuple(refs)  # each worker's `serve_steps`, by rank
        self._ended: list[asyncio.Task] = []
        self._ended_loop: asyncio.AbstractEventLoop | None = None

    def ended(self) -> list[asyncio.Task]:
        """One task per rank, on the running event loop, that raises once that worker's loop ends:
        RayActorError when its actor died, StepLoopEnded when it returned."""
        loop = asyncio.get_running_loop()
        if self._ended_loop is not loop or any(t.cancelled() for t in self._ended):
            self._ended = [loop.create_task(_until_ended(ref, rank)) for rank, ref in enumerate(self.refs)]
            for task in self._ended:  # read by the step that fails; nobody else must warn about it
                task.add_done_callback(_retrieve)
            self._ended_loop = loop
        return self._ended

    def close(self) -> None:
        self.broadcast.close()
        if self._ended_loop is not None and not self._ended_loop.is_closed():
            for task in self._ended:
                task.cancel()
        self._ended = []
        self._ended_loop = None


def _new_broadcast(worker_nodes: Sequence[str | None], num_attention_workers: int) -> StepBroadcast:
    engine_node = ray.get_runtime_context().get_node_id()
    vias = choose_vias(worker_nodes, engine_node)
    log.info("step broadcast: %d worker(s) through the shared-memory ring, %d over TCP",
             vias.count("ring"), vias.count("tcp"))
    return StepBroadcast(vias, num_attention_workers, ray.util.get_node_ip_address())


def _begin(broadcast: StepBroadcast, workers: Sequence) -> StepLoops:
    # Every worker's connect_steps returned: their connections wait in the listeners' backlogs,
    # so accepting takes no time; the bound only keeps a lost connection from holding the loop.
    broadcast.accept(ACCEPT_TIMEOUT_S)
    return StepLoops(broadcast, [w.serve_steps.remote() for w in workers])


def open_step_loops(workers: Sequence, worker_nodes: Sequence[str | None], num_attention_workers: int,
                    timeout_s: float) -> StepLoops:
    """Start every worker's step loop (blocking: for the executor's constructor)."""
    broadcast = _new_broadcast(worker_nodes, num_attention_workers)
    try:
        ray.get([w.connect_steps.remote(broadcast.route(r)) for r, w in enumerate(workers)],
                timeout=timeout_s)
        return _begin(broadcast, workers)
    except BaseException:
        broadcast.close()
        raise


async def open_step_loops_async(workers: Sequence, worker_nodes: Sequence[str | None],
                                num_attention_workers: int, timeout_s: float) -> StepLoops:
    """As open_step_loops, from the event loop (a group restart)."""
    broadcast = _new_broadcast(worker_nodes, num_attention_workers)
    try:
        await asyncio.wait_for(asyncio.gather(*[awaited(w.connect_steps.remote(broadcast.route(r)))
                                                for r, w in enumerate(workers)]), timeout_s)
        return _begin(broadcast, workers)
    except BaseException:
        broadcast.close()
        raise


async def _until_ended(ref: ray.ObjectRef, rank: int) -> None:
    num_steps = await ref
    raise StepLoopEnded(f"rank {rank}'s step loop returned after {num_steps} steps")


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
