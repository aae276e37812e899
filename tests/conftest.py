"""Fixtures shared by every test tier."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # Tests are many small matmuls: more threads only add contention (and CI has 2 cores).
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in demo checkpoint (seed 0), written once per test session."""
    from gateway.demo_checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo-model"), progress=False)


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the demo checkpoint's tokenizer files: for tests that need no weights (milliseconds)."""
    from gateway.demo_checkpoint import write_demo_tokenizer

    out = tmp_path_factory.mktemp("demo-tokenizer")
    write_demo_tokenizer(out)
    return out


_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # After a session that ran Ray Serve and gRPC clients, their native threads can crash
    # CPython's interpreter finalisation (a segfault after the summary line, which would turn a
    # green run red). At exit, once pytest has written everything, leave with its own status.
    import atexit
    import sys

    if "ray" in sys.modules and _exit_status:
        atexit.register(_exit_now, _exit_status[-1])


def _exit_now(status: int) -> None:
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
