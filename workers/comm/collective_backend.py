"""Which process-group backend a model group uses: a pure function of its ranks' devices.

    every rank on a GPU of its own       → "nccl"    rows move GPU to GPU
    every rank on the CPU                → "gloo"
    ranks sharing a GPU, or CPU and GPU  → "staged"  gloo, with each GPU rank copying its rows
                                                      through pinned host memory

NCCL refuses two ranks on one device, and Ray's fractional GPUs (`--gpus-per-worker 0.25`:
one attention + three expert workers on a one-GPU box) put several ranks on one. CUDA IPC
would let such ranks share device buffers instead; staging through the host is the simpler
path that works for every mix (a CPU rank included), so it is the one built. A CPU group on a
GPU node stays on gloo: the backend follows the tensors, not the hardware in the box.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

BACKENDS = ("nccl", "gloo", "staged")


@dataclass(frozen=True)
class RankDevice:
    """Where one rank's tensors live (crosses the actor boundary when a group forms)."""

    kind: str  # "cpu" | "cuda"
    node: str  # the machine: Ray node id, or host name outside Ray
    gpu: str | None = None  # the physical GPU (its UUID) for "cuda"; None for "cpu"

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda"):
            raise ValueError(f"rank device kind must be 'cpu' or 'cuda', got {self.kind!r}")
        if (self.kind == "cuda") != (self.gpu is not None):
            raise ValueError("a 'cuda' rank names its GPU and a 'cpu' rank names none")

    def __str__(self) -> str:
        return "cpu" if self.gpu is None else f"cuda[{self.gpu[:12]}]"


def choose_backend(devices: Sequence[RankDevice]) -> str:
    if not devices:
        raise ValueError("a process group needs at least one rank")
    if all(d.kind == "cpu" for d in devices):
        return "gloo"
    gpus = Counter((d.node, d.gpu) for d in devices if d.kind == "cuda")
    if len(gpus) == len(devices) and max(gpus.values()) == 1:
        return "nccl"
    return "staged"


def describe_choice(devices: Sequence[RankDevice], backend: str) -> str:
    """One log line: the backend and why (which ranks share which device)."""
    ranks = ", ".join(f"{rank}:{d}" for rank, d in enumerate(devices))
    return f"process group backend {backend} for ranks {ranks}"
