"""Which addresses listen on a TCP port here, read from /proc/net/tcp{,6} (Linux), and whether
that is more than `--host` allows.

`moe-serve serve` uses it after Serve has started to prove gRPC listens only where `--host` says
(gateway/grpc_bind.py): a socket that listens, not a connection attempt, is what exposes a port,
and probing the machine's other addresses would send traffic elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

LISTEN = "0A"  # the `st` column of a socket in LISTEN state
WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_proc_net_tcp(text: str, byteorder: str = sys.byteorder) -> list[tuple[IPAddress, int]]:
    """(address, port) of every listening socket in the text of /proc/net/tcp or /proc/net/tcp6.

    The kernel prints each address as the hex of its 32-bit words in host byte order.
    """
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != LISTEN:
            continue
        hex_address, hex_port = fields[1].split(":")
        raw = bytes.fromhex(hex_address)
        if byteorder == "little":
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        address = ipaddress.ip_address(raw)
        # gRPC binds an IPv4 host on an IPv6 socket at the mapped address (::ffff:127.0.0.1).
        mapped = getattr(address, "ipv4_mapped", None)
        out.append((mapped or address, int(hex_port, 16)))
    return out


def listening_addresses(port: int, proc: Path = Path("/proc/net")) -> list[IPAddress]:
    """Addresses with a socket listening on TCP `port` in this network namespace."""
    found = []
    for name in ("tcp", "tcp6"):
        try:
            text = (proc / name).read_text()
        except OSError:  # no IPv6, or not Linux
            continue
        found += [address for address, p in parse_proc_net_tcp(text) if p == port]
    return found


def host_addresses(host: str) -> frozenset[IPAddress]:
    """The addresses `host` (a literal or a name such as localhost) stands for."""
    try:
        return frozenset({ipaddress.ip_address(host.strip("[]"))})
    except ValueError:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        return frozenset(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos)


def beyond_host(host: str, listening: Iterable[IPAddress]) -> list[IPAddress]:
    """The listening addresses `host` does not allow: all but its own, none for a wildcard host."""
    if host in WILDCARDS:
        return []
    allowed = host_addresses(host)
    return sorted({a for a in listening if a not in allowed}, key=str)
