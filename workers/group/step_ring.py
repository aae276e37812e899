"""The step ring: each step's message, written once by the engine into shared memory, read by
every worker on the engine's node (cluster/step_broadcast.py writes, workers/group/step_link.py reads).

A few fixed-size slots, step `seq` in slot `seq % num_slots`, each with its own header
(the step's sequence number, the payload's length) ahead of the payload. The ring carries
the bytes only; a worker learns that step `seq` is there from a small frame on its socket
(workers/group/step_frame.py), so nobody polls shared memory (on a two-core box a spinning reader
takes a core from the work), and the socket's system calls order the reads after the write.
The engine awaits every result before it writes the next step, so a slot is never rewritten
while a worker reads it; the slot's sequence number is checked before and after reading
anyway, so a reader that fell behind fails loudly instead of reading another step.

Layout: header (magic, num_slots, slot_bytes, last seq written), then num_slots × (slot
header, slot_bytes of payload).
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import sys
from collections.abc import Callable
from multiprocessing import shared_memory

MAGIC = b"MSR1"
HEADER = struct.Struct("<4sIIQ")  # magic, num_slots, slot_bytes, last seq written
SLOT_HEADER = struct.Struct("<QQ")  # seq, payload length
DEFAULT_NUM_SLOTS = 4
DEFAULT_SLOT_BYTES = 1 << 20  # a decode step of a few hundred sequences is tens of KiB


class StaleSlot(RuntimeError):
    """The slot holds another step than the one asked for: the reader fell behind the writer."""


class StepRing:
    def __init__(self, name: str, buf: memoryview, release: Callable[[], None], num_slots: int,
                 slot_bytes: int) -> None:
        self.name = name
        self.buf = buf
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self._release = release  # unmaps, and for the writer removes the segment

    @classmethod
    def create(cls, num_slots: int = DEFAULT_NUM_SLOTS, slot_bytes: int = DEFAULT_SLOT_BYTES) -> StepRing:
        if num_slots < 1 or slot_bytes < 1:
            raise ValueError(f"a ring needs slots of some size, got {num_slots} × {slot_bytes} bytes")
        size = HEADER.size + num_slots * (SLOT_HEADER.size + slot_bytes)
        shm = shared_memory.SharedMemory(name=f"moe-step-{secrets.token_hex(6)}", create=True, size=size)
        HEADER.pack_into(shm.buf, 0, MAGIC, num_slots, slot_bytes, 0)
        for slot in range(num_slots):
            SLOT_HEADER.pack_into(shm.buf, cls._slot_offset(slot, slot_bytes), 0, 0)

        def release() -> None:
            _close(shm)
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        return cls(shm.name, shm.buf, release, num_slots, slot_bytes)

    @classmethod
    def attach(cls, name: str) -> StepRing:
        buf, release = _attach(name)
        magic, num_slots, slot_bytes, _ = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            release()
            raise ValueError(f"shared memory {name!r} is not a step ring")
        return cls(name, buf, release, num_slots, slot_bytes)

    def fits(self, num_bytes: int) -> bool:
        return num_bytes <= self.slot_bytes

    @property
    def last_seq(self) -> int:
        return HEADER.unpack_from(self.buf, 0)[3]

    def write(self, seq: int, payload: bytes) -> None:
        if not self.fits(len(payload)):
            raise ValueError(f"a {len(payload)}-byte step does not fit a {self.slot_bytes}-byte slot")
        start = self._slot_offset(seq % self.num_slots, self.slot_bytes)
        data = start + SLOT_HEADER.size
        self.buf[data:data + len(payload)] = payload
        SLOT_HEADER.pack_into(self.buf, start, seq, len(payload))
        HEADER.pack_into(self.buf, 0, MAGIC, self.num_slots, self.slot_bytes, seq)

    def read(self, seq: int) -> bytes:
        """Step `seq`'s payload (a copy). Raises StaleSlot when the slot holds another step."""
        start = self._slot_offset(seq % self.num_slots, self.slot_bytes)
        found, length = SLOT_HEADER.unpack_from(self.buf, start)
        if found != seq:
            raise StaleSlot(f"step {seq} was asked for, slot {seq % self.num_slots} holds step {found}")
        data = start + SLOT_HEADER.size
        payload = bytes(self.buf[data:data + length])
        if SLOT_HEADER.unpack_from(self.buf, start)[0] != seq:
            raise StaleSlot(f"step {seq} was overwritten while it was read")
        return payload

    def close(self) -> None:
        """Unmap; the writer also removes the segment (mappings that remain stay valid)."""
        release, self._release = self._release, lambda: None
        self.buf = memoryview(b"")
        release()

    @staticmethod
    def _slot_offset(slot: int, slot_bytes: int) -> int:
        return HEADER.size + slot * (SLOT_HEADER.size + slot_bytes)


def _attach(name: str) -> tuple[memoryview, Callable[[], None]]:
    """Map an existing segment without adopting it: its buffer, and how to unmap it.

    Before Python 3.13 `SharedMemory(name)` registers the segment with this process's resource
    tracker, which removes it when this process exits (CPython issue 82300): a reader that
    exits would remove the engine's ring. 3.13 has `track=False`; before it, map it the way
    SharedMemory does, minus the registration.
    """
    if sys.version_info >= (3, 13):
        shm = shared_memory.SharedMemory(name=name, track=False)
        return shm.buf, lambda: _close(shm)
    import _posixshmem

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        mapped = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    buf = memoryview(mapped)

    def release() -> None:
        buf.release()
        mapped.close()
    return buf, release


def _close(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:
        pass  # a view of it is still alive somewhere; the mapping goes with the process
