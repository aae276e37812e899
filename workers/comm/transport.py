"""Transports: how dispatch and combine move rows between the ranks of one model group.

One code path, `torch.distributed.all_to_all_single` with explicit split sizes (DESIGN.md
§3): gloo supports uneven and zero splits there, while the list form `all_to_all` fails on
uneven sizes. Ray itself has no all-to-all.

Rendezvous: rank 0 picks its own routable address (`pick_rendezvous_address`) and a free
port (`pick_free_port`) and publishes them (through Ray, outside this module); every rank
then calls `init_process_group` with them. Each actor is its own process, so each one's
default process group is the model group's.

`LocalTransport` is the world-size-1 loopback used by single-process tests.

Shapes: N rows sent, M rows received, H hidden (any trailing shape works), W world, C columns.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from workers.comm.collective_backend import BACKENDS

Counts = Sequence[int]  # one per rank
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Transfer:
    """One collective call, or the sum of several: what went in and out and how long it took."""

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0

    def __add__(self, other: Transfer) -> Transfer:
        return Transfer(self.bytes_sent + other.bytes_sent, self.bytes_received + other.bytes_received,
                        self.seconds + other.seconds)


class Transport(Protocol):
    rank: int
    world_size: int
    device: torch.device
    last_transfer: Transfer  # the most recent call
    total_transfer: Transfer  # every call since construction

    def exchange_counts(self, counts_WC: torch.Tensor) -> torch.Tensor: ...

    def all_to_all(self, x_NH: torch.Tensor, send_counts: Counts) -> tuple[torch.Tensor, tuple[int, ...]]: ...

    def all_to_all_with_counts(self, x_NH: torch.Tensor, send_counts: Counts,
                               recv_counts: Counts) -> torch.Tensor: ...

    def destroy(self) -> None: ...


def pick_rendezvous_address() -> str:
    """This node's address as other nodes reach it (never a loopback constant).

    Inside a Ray worker it is the address Ray itself uses for this node; without Ray it is
    the source address the kernel would route outward with (a UDP `connect` sends nothing),
    falling back to what the host name resolves to.
    """
    ray = sys.modules.get("ray")  # not imported → not initialised; importing it costs a second
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 80))
            return s.getsockname()[0]
        except OSError:
            pass  # no route outward: a host without a network; the host name is all there is
    return socket.gethostbyname(socket.gethostname())


def pick_free_port() -> int:
    """A port free on every interface now (another process could still take it: retry on failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_address_towards(peer: str, port: int = 9) -> str:
    """This host's source address for traffic to `peer` (a UDP `connect` sends nothing)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(peer, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The name of the network interface holding `address` (Linux); None where not found.

    IPv4: each interface's primary address (SIOCGIFADDR); IPv6: /proc/net/if_inet6.
    """
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if ip.version == 6:
        try:
            with open("/proc/net/if_inet6") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) == 6 and ipaddress.ip_address(bytes.fromhex(fields[0])) == ip:
                        return fields[5]
        except OSError:
            pass
        return None
    try:
        import fcntl

        names = [name for _, name in socket.if_nameindex()]
    except (ImportError, OSError):
        return None
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                ifreq = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this one
            if socket.inet_ntoa(ifreq[20:24]) == str(ip):
                return name
    return None


@contextlib.contextmanager
def gloo_bound_towards(master_addr: str) -> Iterator[None]:
    """Make gloo listen on the interface this host reaches the rendezvous through.

    Left alone, gloo binds every rank to whatever this machine's host name resolves to, and
    /etc/hosts commonly maps it to loopback (127.0.1.1 on Debian, 127.0.0.1 in containers):
    each rank then advertises a loopback address to the others, the TCP-store rendezvous
    still succeeds and `connectFullMesh` fails ("Connection refused, remote=[127.0.0.1]")
    as soon as the group spans two machines. GLOO_SOCKET_IFNAME, where set, wins; so does
    the old behaviour where the interface cannot be found.
    """
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        yield
        return
    try:
        iface = interface_of(local_address_towards(master_addr))
    except OSError:
        iface = None
    if iface is None:
        yield
        return
    os.environ["GLOO_SOCKET_IFNAME"] = iface  # read once, when the process group is built
    try:
        yield
    finally:
        os.environ.pop("GLOO_SOCKET_IFNAME", None)


def init_method(master_addr: str, master_port: int) -> str:
    host = f"[{master_addr}]" if ":" in master_addr else master_addr  # IPv6 needs brackets
    return f"tcp://{host}:{master_port}"


class ProcessGroupTransport:
    """all_to_all over this process's torch.distributed default group.

    `device` is where callers' rows live. Under "nccl" the collectives run there; under "gloo"
    and "staged" they run on host tensors, and under "staged" rows on a GPU are copied through
    pinned host memory on the way in and out (collective_backend.py says why).
    """

    def __init__(self, rank: int, world_size: int, backend: str, device: torch.device) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"the nccl backend moves GPU tensors; this rank's device is {device}")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = device
        self.collective_device = device if backend == "nccl" else torch.device("cpu")
        self.group = dist.group.WORLD
        self.last_transfer = Transfer()
        self.total_transfer = Transfer()

    def exchange_counts(self, counts_WC: torch.Tensor) -> torch.Tensor:
        """Row r of `counts_WC` goes to rank r; row s of the result came from rank s (int64).

        The result stays where the collective ran: callers read it on the host anyway (the
        row all-to-all needs its split sizes there), and a GPU copy would only add a sync.
        """
        if counts_WC.shape[0] != self.world_size:
            raise ValueError(f"counts have {counts_WC.shape[0]} rows, world size is {self.world_size}")
        send_WC = counts_WC.to(self.collective_device, torch.int64).contiguous()
        recv_WC = torch.empty_like(send_WC)
        start = time.perf_counter()
        dist.all_to_all_single(recv_WC, send_WC, group=self.group)
        self._record(send_WC.nbytes, recv_WC.nbytes, start)
        return recv_WC

    def all_to_all(self, x_NH: torch.Tensor, send_counts: Counts) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Rows [sum(send[:r]), sum(send[:r+1])) go to rank r; returns the rows received and their counts."""
        counts = torch.tensor(send_counts, dtype=torch.int64).view(self.world_size, 1)
        counts_from = self.exchange_counts(counts)
        first = self.last_transfer
        recv_counts = tuple(counts_from.view(-1).tolist())
        y_MH = self.all_to_all_with_counts(x_NH, send_counts, recv_counts)
        self.last_transfer = first + self.last_transfer
        return y_MH, recv_counts

    def all_to_all_with_counts(self, x_NH: torch.Tensor, send_counts: Counts,
                               recv_counts: Counts) -> torch.Tensor:
        """As `all_to_all` when the receive counts are already known (combine knows them from dispatch)."""
        if len(send_counts) != self.world_size or len(recv_counts) != self.world_size:
            raise ValueError(f"need {self.world_size} send and receive counts, "
                             f"got {send_counts}, {recv_counts}")
        if sum(send_counts) != x_NH.shape[0]:
            raise ValueError(f"send counts {send_counts} do not add up to the {x_NH.shape[0]} rows given")
        shape_MH = (sum(recv_counts), *x_NH.shape[1:])
        staged = x_NH.device != self.collective_device
        if staged:
            # Pinned buffers: the copy back to the GPU can then run without blocking the host.
            x_NH = torch.empty(x_NH.shape, dtype=x_NH.dtype, pin_memory=True).copy_(x_NH)
            y_MH = torch.empty(shape_MH, dtype=x_NH.dtype, pin_memory=True)
        else:
            x_NH = x_NH.contiguous()
            y_MH = x_NH.new_empty(shape_MH)
        start = time.perf_counter()
        dist.all_to_all_single(y_MH, x_NH, output_split_sizes=list(recv_counts),
                               input_split_sizes=list(send_counts), group=self.group)
        self._record(x_NH.nbytes, y_MH.nbytes, start)
        return y_MH.to(self.device, non_blocking=True) if staged else y_MH

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _record(self, bytes_sent: int, bytes_received: int, start: float) -> None:
        # On GPUs this times the launch plus any synchronisation the caller forces; the
        # counts exchange is always followed by a .tolist(), which synchronises.
        self.last_transfer = Transfer(bytes_sent, bytes_received, time.perf_counter() - start)
        self.total_transfer = self.total_transfer + self.last_transfer


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int,
                       backend: str, device: torch.device = CPU,
                       timeout: timedelta = timedelta(seconds=60)) -> ProcessGroupTransport:
    """Join the model group's process group; every rank calls this with rank 0's address and port.

    `backend` comes from `collective_backend.choose_backend` over every rank's device, so all
    ranks agree on it. `timeout` bounds the rendezvous and every later collective, so a dead
    peer surfaces as an error instead of a hang.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dist.is_initialized():
        raise RuntimeError("this process already has a process group; destroy() the old transport first")
    dist_backend = "nccl" if backend == "nccl" else "gloo"
    with gloo_bound_towards(master_addr) if dist_backend == "gloo" else contextlib.nullcontext():
        dist.init_process_group(dist_backend, init_method=init_method(master_addr, master_port), rank=rank,
                                world_size=world_size, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    return ProcessGroupTransport(rank, world_size, backend, device)


class LocalTransport:
    """World size 1: every row comes straight back (a copy, as a real collective would give)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device(device)
        self.last_transfer = Transfer()
        self.total_transfer = Transfer()

    def exchange_counts(self, counts_WC: torch.Tensor) -> torch.Tensor:
        if counts_WC.shape[0] != 1:
            raise ValueError(f"counts have {counts_WC.shape[0]} rows, world size is 1")
        return self._loop(counts_WC.to(self.device, torch.int64))

    def all_to_all(self, x_NH: torch.Tensor, send_counts: Counts) -> tuple[torch.Tensor, tuple[int, ...]]:
        return self.all_to_all_with_counts(x_NH, send_counts, send_counts), tuple(send_counts)

    def all_to_all_with_counts(self, x_NH: torch.Tensor, send_counts: Counts,
                               recv_counts: Counts) -> torch.Tensor:
        if list(send_counts) != [x_NH.shape[0]] or list(recv_counts) != [x_NH.shape[0]]:
            raise ValueError(f"world size 1 sends and receives all {x_NH.shape[0]} rows, "
                             f"got {send_counts}, {recv_counts}")
        return self._loop(x_NH)

    def destroy(self) -> None:
        pass

    def _loop(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        y = x.clone()
        self.last_transfer = Transfer(x.nbytes, y.nbytes, time.perf_counter() - start)
        self.total_transfer = self.total_transfer + self.last_transfer
        return y
