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
    from workers.demo_checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo-model"), progress=False)


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the demo checkpoint's tokenizer files: for tests that need no weights (milliseconds)."""
    from workers.demo_checkpoint import write_demo_tokenizer

    out = tmp_path_factory.mktemp("demo-tokenizer")
    write_demo_tokenizer(out)
    return out
