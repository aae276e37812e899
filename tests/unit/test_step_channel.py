"""The step channel without Ray: the engine's StepBroadcast feeding real worker step loops
(workers/group/step_loop.py) that run on threads here, through the shared-memory ring and over TCP."""

from __future__ import annotations

import asyncio
import socket
import threading
from multiprocessing import shared_memory

import pytest

from cluster.step_broadcast import StepBroadcast, StepChannelClosed, WorkerStepError, choose_vias
from workers.group import step_frame
from workers.group.step_link import StepLink
from workers.group.step_loop import serve_steps
from workers.group.step_message import StepMessage, StepRoute
from workers.group.step_ring import StaleSlot, StepRing
from workers.model.batch_spec import ScheduledBatch, ScheduledSeq
from workers.model.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def batch(*seq_ids: int, low_latency_tokens: int | None = None) -> ScheduledBatch:
    return ScheduledBatch(tuple(ScheduledSeq(i, (3 + i,), 4, (0,), True, GREEDY, 0) for i in seq_ids),
                          low_latency_tokens=low_latency_tokens)


# -- the ring -----------------------------------------------------------------------------


def test_ring_readers_see_each_step_until_the_writer_laps_them():
    ring = StepRing.create(num_slots=2, slot_bytes=16)
    reader = StepRing.attach(ring.name)
    try:
        ring.write(1, b"one")
        ring.write(2, b"two!")
        assert (reader.read(1), reader.read(2), reader.last_seq) == (b"one", b"two!", 2)
        ring.write(3, b"three")  # slot 1 again
        assert reader.read(3) == b"three"
        with pytest.raises(StaleSlot, match="holds step 3"):
            reader.read(1)
        assert ring.fits(16) and not ring.fits(17)
        with pytest.raises(ValueError, match="does not fit"):
            ring.write(4, bytes(17))
    finally:
        reader.close()
        ring.close()
    with pytest.raises(FileNotFoundError):  # the writer removed it; a reader's close did not
        StepRing.attach(ring.name)


def test_a_segment_that_is_not_a_ring_is_refused():
    shm = shared_memory.SharedMemory(create=True, size=64)
    try:
        with pytest.raises(ValueError, match="not a step ring"):
            StepRing.attach(shm.name)
    finally:
        shm.close()
        shm.unlink()


# -- frames and routes --------------------------------------------------------------------


def test_frames_come_out_whole_however_the_bytes_arrive():
    stream = step_frame.encode(step_frame.RESULT, 7, b"abc") + step_frame.encode(step_frame.IN_RING, 8)
    buf = step_frame.FrameBuffer()
    frames = []
    for i in range(len(stream)):
        buf.feed(stream[i:i + 1])
        while (f := buf.next()) is not None:
            frames.append(f)
    assert frames == [step_frame.Frame(step_frame.RESULT, 7, b"abc"), step_frame.Frame(step_frame.IN_RING, 8)]
    buf.feed(b"\x09" + bytes(step_frame.HEADER.size - 1))
    with pytest.raises(step_frame.BadFrame):
        buf.next()


def test_workers_on_the_engines_node_read_the_ring_others_use_tcp():
    assert choose_vias(["a", "b", "a", None], "a") == ("ring", "tcp", "ring", "tcp")
    assert choose_vias(["a", None], None) == ("tcp", "tcp")
    with pytest.raises(ValueError):
        StepRoute(0, b"t" * 16, "ring", "\0x")  # a ring route names its ring


# -- the whole channel --------------------------------------------------------------------


class Group:
    """A broadcast and one thread per rank running the real step loop over `run_step(rank, msg)`."""

    def __init__(self, vias, num_attention_workers, run_step, **ring) -> None:
        self.broadcast = StepBroadcast(vias, num_attention_workers, "127.0.0.1", **ring)
        self.served: dict[int, int] = {}
        self.links = [StepLink.connect(self.broadcast.route(r)) for r in range(len(vias))]
        self.broadcast.accept(timeout_s=10)
        self.threads = [threading.Thread(target=self._serve, args=(r, link, run_step), daemon=True)
                        for r, link in enumerate(self.links)]
        for t in self.threads:
            t.start()

    def _serve(self, rank, link, run_step):
        self.served[rank] = serve_steps(link, lambda message: run_step(rank, message))

    async def step(self, message: StepMessage) -> list:
        seq = self.broadcast.publish(message)
        return await asyncio.gather(*[self.broadcast.result(r, seq) for r in range(len(self.links))],
                                    return_exceptions=True)

    def close(self) -> dict[int, int]:
        self.broadcast.close()
        for t in self.threads:
            t.join(timeout=10)
        return self.served


def echo(rank: int, message: StepMessage):
    """Rank 0 is the attention worker: its batch's sequences; expert ranks: what they were told."""
    if rank == 0:
        if message.batches[0].num_seqs == 0:
            raise ValueError("boom: an empty batch")
        return tuple(s.seq_id for s in message.batches[0].seqs)
    return rank, message.low_latency_tokens, len(message.batches)


@pytest.mark.parametrize("slot_bytes", [1 << 16, 64], ids=["in-ring", "too-big-for-a-slot"])
def test_every_worker_gets_each_step_and_answers_it(slot_bytes):
    group = Group(("ring", "ring", "tcp"), 1, echo, slot_bytes=slot_bytes)
    try:
        async def main():
            return [await group.step(StepMessage(n, (batch(*range(n), low_latency_tokens=n),)))
                    for n in (1, 5, 2)]
        got = asyncio.run(main())
    finally:
        served = group.close()
    # The expert on the engine's node reads the whole step from the ring; a step too big for a
    # slot comes inline, and expert workers then get the copy without batches, as over TCP.
    in_ring = int(slot_bytes > 64)
    assert got == [[tuple(range(n)), (1, n, in_ring), (2, n, 0)] for n in (1, 5, 2)]
    assert served == {0: 3, 1: 3, 2: 3}  # closing the broadcast ended every loop


def test_a_step_that_raises_is_reported_and_the_loop_carries_on():
    group = Group(("ring", "tcp"), 1, echo)
    try:
        async def main():
            failed = await group.step(StepMessage(None, (batch(),)))
            again = await group.step(StepMessage(None, (batch(4),)))
            return failed, again
        failed, again = asyncio.run(main())
    finally:
        group.close()
    assert isinstance(failed[0], WorkerStepError) and "ValueError: boom: an empty batch" in str(failed[0])
    assert "Traceback" in failed[0].failure.traceback and failed[1] == (1, None, 0)
    assert again == [(4,), (1, None, 0)]


@pytest.mark.parametrize("via", ["ring", "tcp"])
def test_a_worker_whose_socket_closes_fails_the_step(via):
    group = Group((via, via), 1, echo)
    try:
        group.links[1].sock.shutdown(socket.SHUT_RDWR)  # as a killed process's socket does

        async def main():
            return await group.step(StepMessage(None, (batch(1),)))
        got = asyncio.run(main())
    finally:
        group.close()
    assert got[0] == (1,) and isinstance(got[1], StepChannelClosed)


def test_answers_to_an_abandoned_step_are_dropped_across_event_loops():
    release = threading.Event()

    def slow_first(rank, message):
        if rank == 0 and message.batches[0].seqs[0].seq_id == 1:
            release.wait(10)
        return echo(rank, message)

    group = Group(("ring", "tcp"), 1, slow_first)
    try:
        async def abandon():  # the engine stops waiting (a cancelled step): its answers come later
            seq = group.broadcast.publish(StepMessage(None, (batch(1),)))
            waiting = asyncio.ensure_future(group.broadcast.result(0, seq))
            await asyncio.sleep(0.05)
            waiting.cancel()

        async def next_step():
            release.set()
            return await group.step(StepMessage(None, (batch(2),)))
        asyncio.run(abandon())
        got = asyncio.run(next_step())  # another event loop, as another engine would have
    finally:
        group.close()
    assert got == [(2,), (1, None, 0)]


def test_a_connection_without_the_groups_token_is_refused():
    broadcast = StepBroadcast(("tcp",), 1, "127.0.0.1")
    try:
        route = broadcast.route(0)
        stranger = socket.create_connection(route.address)
        stranger.sendall(step_frame.hello(b"x" * 16, 0))
        link = StepLink.connect(route)
        broadcast.accept(timeout_s=10)
        assert stranger.recv(1) == b""  # closed by the engine
        assert list(broadcast.links) == [0]
        link.close()
        stranger.close()
    finally:
        broadcast.close()


def test_accept_names_the_ranks_that_never_connected():
    broadcast = StepBroadcast(("ring", "tcp"), 1, "127.0.0.1")
    try:
        link = StepLink.connect(broadcast.route(1))
        with pytest.raises(TimeoutError, match=r"ranks \[0\]"):
            broadcast.accept(timeout_s=0.2)
        link.close()
    finally:
        broadcast.close()
