"""What travels on a step socket between the engine and one worker: length-prefixed frames.

Engine → worker, one per step: STEP (the pickled StepMessage follows) or IN_RING (nothing
follows: the message is in the step ring's slot for `seq`, workers/group/step_ring.py).
Worker → engine, one per step: RESULT (the pickled result follows) or FAILURE (a pickled
StepFailure). A worker opens its socket with a HELLO (the group's token and its rank, packed,
never pickled), so the engine unpickles nothing from a connection it has not recognised.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<B7xQQ")  # kind, step seq, length of the payload that follows
HELLO = struct.Struct("<16sI")  # the group's token, the worker's rank
STEP, IN_RING, RESULT, FAILURE = 1, 2, 3, 4
KINDS = (STEP, IN_RING, RESULT, FAILURE)
MAX_PAYLOAD_BYTES = 1 << 32  # a corrupt header must not make a reader wait for petabytes


@dataclass(frozen=True)
class Frame:
    kind: int  # one of KINDS
    seq: int
    payload: bytes = b""


class BadFrame(RuntimeError):
    """The stream is not frames any more (a peer that wrote something else)."""


def encode(kind: int, seq: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, seq, len(payload)) + payload


def hello(token: bytes, rank: int) -> bytes:
    return HELLO.pack(token, rank)


def _header(data) -> tuple[int, int, int]:
    kind, seq, length = HEADER.unpack(data)
    if kind not in KINDS or length > MAX_PAYLOAD_BYTES:
        raise BadFrame(f"not a step frame: kind {kind}, {length} bytes")
    return kind, seq, length


class FrameBuffer:
    """Bytes in as they arrive, whole frames out: the engine reads without blocking."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> None:
        self._data += data

    def next(self) -> Frame | None:
        if len(self._data) < HEADER.size:
            return None
        kind, seq, length = _header(self._data[:HEADER.size])
        end = HEADER.size + length
        if len(self._data) < end:
            return None
        payload = bytes(self._data[HEADER.size:end])
        del self._data[:end]
        return Frame(kind, seq, payload)


def recv_exactly(sock: socket.socket, num_bytes: int) -> bytes | None:
    """Blocking; None when the peer closed before `num_bytes` came."""
    buf = bytearray(num_bytes)
    view = memoryview(buf)
    got = 0
    while got < num_bytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buf)


def recv_frame(sock: socket.socket) -> Frame | None:
    """Blocking; None when the peer closed the socket."""
    head = recv_exactly(sock, HEADER.size)
    if head is None:
        return None
    kind, seq, length = _header(head)
    payload = recv_exactly(sock, length) if length else b""
    if payload is None:
        return None
    return Frame(kind, seq, payload)
