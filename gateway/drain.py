"""Graceful drain on shutdown: in-flight streams finish, new requests get 503 (DESIGN.md §5).

Serve's own replica shutdown (`serve.delete`, `serve.shutdown`, scale-down) already waits for a
replica's ongoing requests, up to `graceful_shutdown_timeout_s`; but while an application is
being deleted the proxy answers new requests with a plain-text 404, and a load balancer that
still routes to us would see requests fail oddly. So `moe-serve serve` drains first:

1. `drain_app` starts a `DrainSignal` actor named after the application. Every engine replica
   polls for it (`DrainWatch`, every DRAIN_POLL_S); from the moment it sees it, the replica
   admits nothing new (`EngineDraining`: HTTP 503 + `Retry-After`, gRPC UNAVAILABLE), `ready()`
   says False (`/ready` 503, gRPC health NOT_SERVING) and it reports its in-flight requests to
   the signal.
2. `drain_app` returns when every replica that reported has nothing in flight, or at the drain
   deadline; a replica still busy then ends its remaining requests with `EngineDraining` (an
   SSE error event then `[DONE]`, or UNAVAILABLE), so none is cut off silently.
3. The caller then deletes the application (or shuts Serve down) while the signal lives.

A signal, not a method call through a handle, because a handle call reaches one replica of a
deployment, and every replica must stop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import ray

log = logging.getLogger(__name__)

NAMESPACE = "moe-serve"
DRAIN_POLL_S = 0.25  # how soon a replica notices a drain: far below any load balancer's interval


def signal_name(app_name: str) -> str:
    return f"drain:{app_name}"


@ray.remote(num_cpus=0)
class DrainSignal:
    """Exists while an application drains; its replicas report their in-flight requests here."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline  # time.time() after which replicas end what is left
        self._in_flight: dict[str, int] = {}

    def deadline(self) -> float:
        return self._deadline

    def report(self, replica_id: str, num_in_flight: int) -> None:
        self._in_flight[replica_id] = num_in_flight

    def in_flight(self) -> dict[str, int]:
        return dict(self._in_flight)


def drained(in_flight: dict[str, int]) -> bool:
    """Every replica that has seen the signal reports nothing in flight (no report: none seen it,
    and a replica that has not polled yet has not admitted anything since the signal either)."""
    return all(n == 0 for n in in_flight.values())


@contextmanager
def drain_app(app_name: str, timeout_s: float) -> Iterator[int]:
    """Drain `app_name`; yields the requests still in flight at the end (0 when all finished).

    The signal lives until the block ends: delete the application inside it, so the replicas
    refuse new requests until they are gone.
    """
    deadline = time.time() + timeout_s
    signal = DrainSignal.options(name=signal_name(app_name), namespace=NAMESPACE).remote(deadline)
    try:
        ray.get(signal.deadline.remote())  # started: replicas can find it from now on
        log.info("draining %s for at most %.0f s", app_name, timeout_s)
        time.sleep(2 * DRAIN_POLL_S)  # every replica has polled once, and reported
        while not drained(in_flight := ray.get(signal.in_flight.remote())) and time.time() < deadline:
            time.sleep(DRAIN_POLL_S)
        # Past the deadline the replicas end their requests themselves; one more poll round
        # lets them report it.
        if not drained(in_flight):
            time.sleep(2 * DRAIN_POLL_S)
            in_flight = ray.get(signal.in_flight.remote())
        yield sum(in_flight.values())
    finally:
        ray.kill(signal)


class DrainWatch:
    """A replica's view of the drain signal: polls for it and reports `count_in_flight()`.

    `on_expired` runs once when the drain deadline passes with requests still in flight.
    """

    def __init__(self, app_name: str, replica_id: str, count_in_flight: Callable[[], int],
                 on_expired: Callable[[], None]) -> None:
        self._name = signal_name(app_name)
        self._replica_id = replica_id
        self._count_in_flight = count_in_flight
        self._on_expired = on_expired
        self._signal = None
        self._deadline: float | None = None
        self._expired = False
        self._task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self._signal is not None

    @property
    def expired(self) -> bool:
        return self._expired

    async def start(self) -> None:
        """Look once now (a request must not slip in before the first poll), then keep polling."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll_forever())
            await self.poll()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_POLL_S)
            try:
                await self.poll()
            except Exception as exc:  # the signal went away with its driver: keep the last state
                log.warning("drain poll failed: %s: %s", type(exc).__name__, exc)

    async def poll(self) -> None:
        if self._signal is None:
            self._signal = await asyncio.to_thread(_find, self._name)
            if self._signal is None:
                return
            self._deadline = await self._signal.deadline.remote()
            log.info("draining: admitting no new requests")
        if not self._expired and time.time() >= self._deadline and self._count_in_flight():
            self._expired = True
            self._on_expired()
        await self._signal.report.remote(self._replica_id, self._count_in_flight())


def is_draining(app_name: str) -> bool:
    """Whether `app_name` is draining now (its signal exists); blocking: call it off the event loop."""
    return _find(signal_name(app_name)) is not None


def _find(name: str):
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:  # no such actor: not draining
        return None
