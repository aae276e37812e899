"""A worker's end of the step channel: connect once, then receive each step and send its result.

The engine's end is cluster/step_broadcast.py. Blocking sockets: the worker's step loop has a
thread of its own (workers/group/step_loop.py) and nothing else to do while it waits.
"""

from __future__ import annotations

import pickle
import socket

from workers.group import step_frame
from workers.group.step_message import StepFailure, StepMessage, StepRoute
from workers.group.step_ring import StepRing

CONNECT_TIMEOUT_S = 30.0


class StepLink:
    def __init__(self, route: StepRoute, sock: socket.socket, ring: StepRing | None) -> None:
        self.route = route
        self.sock = sock
        self.ring = ring

    @classmethod
    def connect(cls, route: StepRoute) -> StepLink:
        """Connect and say who we are. The engine accepts later: the connection waits in its
        listener's backlog, so this returns as soon as the kernel queued it."""
        ring = StepRing.attach(route.ring_name) if route.via == "ring" else None
        family = socket.AF_UNIX if route.via == "ring" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(route.address)
            sock.settimeout(None)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a step is one small write
            sock.sendall(step_frame.hello(route.token, route.rank))
        except BaseException:
            sock.close()
            if ring is not None:
                ring.close()
            raise
        return cls(route, sock, ring)

    def receive(self) -> step_frame.Frame | None:
        """The next step's frame; None once the engine closed the channel."""
        return step_frame.recv_frame(self.sock)

    def message(self, frame: step_frame.Frame) -> StepMessage:
        if frame.kind == step_frame.IN_RING:
            if self.ring is None:
                raise step_frame.BadFrame("a step in the ring, on a link without one")
            return pickle.loads(self.ring.read(frame.seq))
        if frame.kind != step_frame.STEP:
            raise step_frame.BadFrame(f"the engine sent a frame of kind {frame.kind}")
        return pickle.loads(frame.payload)

    def reply(self, seq: int, result: object) -> None:
        self.sock.sendall(step_frame.encode(step_frame.RESULT, seq, pickle.dumps(result, protocol=5)))

    def report(self, seq: int, failure: StepFailure) -> None:
        self.sock.sendall(step_frame.encode(step_frame.FAILURE, seq, pickle.dumps(failure, protocol=5)))

    def close(self) -> None:
        self.sock.close()
        if self.ring is not None:
            self.ring.close()
