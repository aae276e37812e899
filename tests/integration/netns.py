"""Throwaway "hosts" for tests: Linux network namespaces on a private bridge (root only).

`virtual_hosts(n)` makes n namespaces, host i at 198.18.0.{i+1}/24, all plugged into one
Linux bridge. The bridge lives in a namespace of its own (the "switch"), so nothing is added
to the machine's own network namespace: no addresses, no routes, no links, and the host's
firewall (br_netfilter, a FORWARD policy of DROP) never sees the traffic. Loopback is up in
every host. Only 198.18.0.0/24 (RFC 2544, benchmarking) is used.

Processes started in a host are ended by process id: `ip netns pids` lists exactly the
processes inside our own namespaces, which are all ours. Nothing is killed by name (a
`ray stop` would end every Ray on the machine, other test sessions' included).

    with virtual_hosts(3) as hosts:
        hosts[0].run(["ip", "-br", "addr"])
        proc = hosts[1].popen(["sleep", "5"])
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "198.18.0"  # /24; host i is .{i+1}
IP = "ip"


class NetnsUnavailable(RuntimeError):
    """This process may not create network namespaces (not root, no CAP_NET_ADMIN, no iproute2)."""


def _ip(*args: str, timeout: float = 10.0, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=timeout, check=check)


@dataclass
class Host:
    name: str  # the namespace
    address: str  # its IPv4 address on the bridge
    procs: list[subprocess.Popen] = field(default_factory=list)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], timeout: float, env: dict[str, str] | None = None,
            cwd: str | Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run to completion inside this host (killed after `timeout`, then TimeoutExpired)."""
        return subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=cwd, check=check)

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start inside this host, in a session of its own; ended by `kill_all`."""
        proc = subprocess.Popen(self.cmd(argv), start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process inside this namespace (daemons that outlived their parent included)."""
        res = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []

    def kill_all(self, grace_s: float = 3.0) -> None:
        """SIGTERM every process in the namespace, then SIGKILL what is left after `grace_s`."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            pids = self.pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.pids():
                break
        for proc in self.procs:  # reap our direct children (the `ip netns exec` wrappers)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)


def _check_available() -> None:
    if os.name != "posix" or not hasattr(os, "geteuid"):
        raise NetnsUnavailable("network namespaces need Linux")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CAP_NET_ADMIN)")
    try:
        _ip("-V", timeout=5.0)
    except (OSError, subprocess.SubprocessError) as e:
        raise NetnsUnavailable(f"iproute2's `ip` is not usable: {e}") from e


@contextlib.contextmanager
def virtual_hosts(n: int, prefix: str = "moe") -> Iterator[list[Host]]:
    """n hosts on one bridge; everything (processes, namespaces, bridge) is gone on exit.

    Raises NetnsUnavailable (before creating anything that needs undoing) where namespaces
    cannot be made; any later failure undoes what was made, then propagates.
    """
    if not 1 <= n <= 250:
        raise ValueError(f"1..250 hosts fit in {SUBNET}.0/24, asked for {n}")
    _check_available()
    tag = f"{os.getpid()}-{secrets.token_hex(2)}"  # unique per run: concurrent sessions never collide
    switch = f"{prefix}-{tag}-sw"
    hosts = [Host(f"{prefix}-{tag}-h{i}", f"{SUBNET}.{i + 1}") for i in range(n)]
    made: list[str] = []
    try:
        # The first steps double as the capability probe: where any fails (no CAP_SYS_ADMIN
        # for the namespace, no CAP_NET_ADMIN for its links, no bridge support), skip-worthy.
        for step in (("netns", "add", switch), ("-n", switch, "link", "set", "lo", "up"),
                     ("-n", switch, "link", "add", "br0", "type", "bridge"),
                     ("-n", switch, "link", "set", "br0", "up")):
            res = _ip(*step, check=False)
            if res.returncode != 0:
                why = res.stderr.strip() or f"exit status {res.returncode}"
                raise NetnsUnavailable(f"`ip {' '.join(step)}` failed: {why}")
            if step[:2] == ("netns", "add"):
                made.append(switch)
        for i, host in enumerate(hosts):
            _ip("netns", "add", host.name)
            made.append(host.name)
            # The veth pair is made in the switch, its far end moved into the host as eth0.
            _ip("-n", switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
                "netns", host.name)
            _ip("-n", switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", switch, "link", "set", f"p{i}", "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")
        yield hosts
    finally:
        for host in hosts:
            if host.name in made:
                host.kill_all()
        for name in reversed(made):  # deleting the switch takes the bridge and every veth with it
            _ip("netns", "del", name, check=False)
