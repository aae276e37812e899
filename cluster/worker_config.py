"""What every process that holds model weights runs on: a model group's workers, or the
single-process engine's replica."""

from __future__ import annotations

from dataclasses import dataclass

from workers.device.selection import DEVICE_CHOICES


@dataclass(frozen=True)
class WorkerConfig:
    device: str = "auto"  # auto | cpu | cuda, decided once in each process (workers/device/selection.py)
    dtype: str = "auto"  # "auto": the checkpoint's torch_dtype on a GPU, float32 on a CPU
    num_threads: int = 1  # torch intra-op threads of each group worker

    def __post_init__(self) -> None:
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
