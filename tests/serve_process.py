"""`moe-serve serve` as a subprocess: started, waited for, stopped (tests and benchmarks).

Its output goes to a file: a pipe nobody reads fills up and stalls the server. It runs in a
session of its own, so its Ray processes can be stopped with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

MOE_SERVE = str(Path(sys.executable).with_name("moe-serve"))  # the venv's console script
REPO_ROOT = Path(__file__).resolve().parents[1]


class ServeProcess:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        # As a module from the repository root, not the console script: the GPU machine runs the
        # repo from PYTHONPATH without installing it.
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", *args], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                         start_new_session=True)

    def tail(self, num_chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-num_chars:]

    def wait_ready(self, url: str, timeout_s: float) -> None:
        """Until `url`/ready answers 200; AssertionError (with the log's tail) if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"moe-serve serve exited {self.proc.returncode}:\n{self.tail()}"
            assert time.monotonic() < deadline, f"not ready within {timeout_s:g} s:\n{self.tail()}"
            try:
                if httpx.get(f"{url}/ready", timeout=10).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)

    def stop(self) -> None:
        """Ctrl-C (drain, then Ray down), then SIGKILL of the whole session if anything lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
