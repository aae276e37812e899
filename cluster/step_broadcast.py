"""The engine's end of the step channel: each step reaches every worker's step loop without a
Ray call, and each worker's result comes back on its socket.

Workers on the engine's node read the step from one shared-memory ring (workers/group/step_ring.py),
written once per step; a frame on each one's Unix socket says which slot holds it. Workers on
other nodes get the whole step in a frame on a TCP socket (expert workers a copy without the
batches, which they do not read). Every worker answers on its own socket: a RESULT, or a
FAILURE when its step raised. The workers' end is workers/group/step_link.py; the Ray side (starting
the loops, noticing a dead one) is cluster/step_loops.py.

Sockets are non-blocking and never waited on by a blocked thread: a result is awaited with
the running event loop's reader callback, and a frame too big for the socket's buffer is
finished by a writer callback, so nothing here blocks the engine's loop, and a step
abandoned half way (the engine cancelled, a watchdog fired) loses no bytes of the stream.
Any event loop may drive a broadcast, one after another (tests run each engine in its own).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import secrets
import select
import socket
import time
from collections.abc import Sequence

from workers.group import step_frame
from workers.group.step_message import StepFailure, StepMessage, StepRoute
from workers.group.step_ring import DEFAULT_NUM_SLOTS, DEFAULT_SLOT_BYTES, StepRing

log = logging.getLogger(__name__)

RECV_BYTES = 1 << 16


class StepChannelClosed(ConnectionError):
    """A worker's socket closed or broke: its process died, usually (Ray says so soon after)."""


class WorkerStepError(RuntimeError):
    """A step raised inside a worker's loop; the worker's own error and traceback."""

    def __init__(self, failure: StepFailure) -> None:
        super().__init__(f"rank {failure.rank}: {failure.error}")
        self.failure = failure


def choose_vias(worker_nodes: Sequence[str | None], engine_node: str | None) -> tuple[str, ...]:
    """How each rank gets its steps: "ring" on the engine's Ray node, "tcp" from any other.

    By Ray node, not by machine: simulated nodes on one machine are other nodes, as they would
    be anywhere else."""
    return tuple("ring" if engine_node is not None and node == engine_node else "tcp"
                 for node in worker_nodes)


class _WorkerSocket:
    """One worker's socket as the engine sees it: frames out (queued when the kernel's buffer is
    full), frames in (buffered until whole)."""

    def __init__(self, rank: int, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.rank = rank
        self.sock = sock
        self.frames = step_frame.FrameBuffer()
        self.broken: str | None = None  # why the socket is unusable; set once
        self._outbox = bytearray()
        self._writer_loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future | None = None  # the pending wait for the socket to be readable

    def send(self, data: bytes) -> None:
        if self.broken is not None:
            return  # the step's result() raises it
        if self._outbox:
            self._outbox += data  # keep the order behind what is still queued
            self._watch_writable()
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._break(f"send failed: {type(exc).__name__}: {exc}")
            return
        if sent < len(data):
            self._outbox += data[sent:]
            self._watch_writable()

    def _watch_writable(self) -> None:
        loop = asyncio.get_running_loop()
        if self._writer_loop is not loop:
            self._writer_loop = loop
            loop.add_writer(self.sock.fileno(), self._flush)

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self._outbox)
        except BlockingIOError:
            return
        except OSError as exc:
            self._break(f"send failed: {type(exc).__name__}: {exc}")
            return
        del self._outbox[:sent]
        if not self._outbox:
            self._stop_writing()

    def _stop_writing(self) -> None:
        loop, self._writer_loop = self._writer_loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_writer(self.sock.fileno())

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
        self._outbox.clear()
        self._stop_writing()

    def _pump(self) -> None:
        """Take in whatever the kernel has for us, without waiting."""
        while self.broken is None:
            try:
                data = self.sock.recv(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                self._break(f"receive failed: {type(exc).__name__}: {exc}")
                return
            if not data:
                self._break("the worker closed its step socket")
                return
            self.frames.feed(data)
            if len(data) < RECV_BYTES:
                return

    async def frame_for(self, seq: int) -> step_frame.Frame:
        """The worker's answer to step `seq`; answers to older steps (ones the engine stopped
        waiting for) are dropped on the way."""
        while True:
            self._pump()
            while (frame := self.frames.next()) is not None:
                if frame.seq == seq:
                    return frame
                if frame.seq > seq:
                    raise step_frame.BadFrame(f"rank {self.rank} answered step {frame.seq} before {seq}")
            if self.broken is not None:
                raise StepChannelClosed(f"rank {self.rank}: {self.broken}")
            await self._readable()

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop_reading()  # a wait left behind by an abandoned step: an fd has one reader per loop
        ready = self._waiter = loop.create_future()
        fd = self.sock.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            if self._waiter is ready:
                self._waiter = None
                if not loop.is_closed() and self.sock.fileno() == fd:
                    loop.remove_reader(fd)

    def _stop_reading(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done() and not waiter.get_loop().is_closed():
            waiter.get_loop().remove_reader(self.sock.fileno())
            waiter.cancel()

    def close(self) -> None:
        self._stop_reading()
        self._stop_writing()
        self.sock.close()


class StepBroadcast:
    """Listens for the workers' step sockets, then sends every step and collects every result."""

    def __init__(self, vias: Sequence[str], num_attention_workers: int, host: str, *,
                 num_slots: int = DEFAULT_NUM_SLOTS, slot_bytes: int = DEFAULT_SLOT_BYTES) -> None:
        self.vias = tuple(vias)
        self.num_attention_workers = num_attention_workers
        self.token = secrets.token_bytes(16)
        self.seq = 0
        self.links: dict[int, _WorkerSocket] = {}
        self.ring: StepRing | None = None
        self._unix: socket.socket | None = None
        self._tcp: socket.socket | None = None
        try:
            if "ring" in self.vias:
                self.ring = StepRing.create(num_slots, slot_bytes)
                self._unix = _listen(socket.AF_UNIX, f"\0moe-serve-steps-{secrets.token_hex(8)}")
            if "tcp" in self.vias:
                self._tcp = _listen(socket.AF_INET, (host, 0))
        except BaseException:
            self.close()
            raise

    def route(self, rank: int) -> StepRoute:
        if self.vias[rank] == "ring":
            return StepRoute(rank, self.token, "ring", self._unix.getsockname(), self.ring.name)
        return StepRoute(rank, self.token, "tcp", self._tcp.getsockname()[:2])

    def accept(self, timeout_s: float) -> None:
        """Take every worker's connection, once each has connected (`StepLink.connect` returned):
        they wait in the listeners' backlogs, so this does not wait unless one is missing."""
        deadline = time.monotonic() + timeout_s
        listeners = [s for s in (self._unix, self._tcp) if s is not None]
        while len(self.links) < len(self.vias):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(len(self.vias))) - set(self.links))
                raise TimeoutError(f"ranks {missing} did not connect to the step broadcast in {timeout_s:g}s")
            ready, _, _ = select.select(listeners, [], [], left)
            for listener in ready:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                self._admit(sock, deadline)
        for listener in listeners:  # everyone is here; a restarted group gets a new broadcast
            listener.close()
        self._unix = self._tcp = None

    def _admit(self, sock: socket.socket, deadline: float) -> None:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            raw = step_frame.recv_exactly(sock, step_frame.HELLO.size)
        except OSError:
            raw = None
        if raw is not None:
            token, rank = step_frame.HELLO.unpack(raw)
            if secrets.compare_digest(token, self.token) and 0 <= rank < len(self.vias) \
                    and rank not in self.links:
                if sock.family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.links[rank] = _WorkerSocket(rank, sock)
                return
        log.warning("step broadcast: refused a connection that is not one of the group's workers")
        sock.close()

    def publish(self, message: StepMessage) -> int:
        """Send step `message` to every worker; returns its sequence number for `result`.

        Call from the event loop that awaits the results."""
        self.seq += 1
        seq = self.seq
        full = pickle.dumps(message, protocol=5)
        in_ring = self.ring is not None and self.ring.fits(len(full))
        if in_ring:
            self.ring.write(seq, full)
        frames: dict[str, bytes] = {}

        def frame(kind: str) -> bytes:
            if kind not in frames:
                if kind == "ring":
                    frames[kind] = step_frame.encode(step_frame.IN_RING, seq)
                elif kind == "full":
                    frames[kind] = step_frame.encode(step_frame.STEP, seq, full)
                else:  # expert workers read only the dispatch mode
                    experts = pickle.dumps(dataclasses.replace(message, batches=()), protocol=5)
                    frames[kind] = step_frame.encode(step_frame.STEP, seq, experts)
            return frames[kind]

        for rank, link in self.links.items():
            if self.vias[rank] == "ring" and in_ring:
                link.send(frame("ring"))
            else:
                link.send(frame("full" if rank < self.num_attention_workers else "experts"))
        return seq

    async def result(self, rank: int, seq: int) -> object:
        """Rank `rank`'s result of step `seq`. Raises WorkerStepError when its step raised,
        StepChannelClosed when its socket closed."""
        frame = await self.links[rank].frame_for(seq)
        if frame.kind == step_frame.RESULT:
            return pickle.loads(frame.payload)
        if frame.kind == step_frame.FAILURE:
            failure: StepFailure = pickle.loads(frame.payload)
            log.warning("step %d failed on rank %d:\n%s", seq, rank, failure.traceback)
            raise WorkerStepError(failure)
        raise step_frame.BadFrame(f"rank {rank} sent a frame of kind {frame.kind}")

    def close(self) -> None:
        """Close every socket (each worker's loop then ends) and remove the ring."""
        for link in self.links.values():
            link.close()
        self.links.clear()
        for listener in (self._unix, self._tcp):
            if listener is not None:
                listener.close()
        self._unix = self._tcp = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None


def _listen(family: int, address) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
