"""The one device decision of a process, and the dtype that follows from it.

A process (an attention or expert worker, or the single-process engine) decides its device
once, where it starts, with `select_device`, and passes the answer down like a dtype: weights
load straight onto it, and the KV cache, step metadata, routing, plans and sampling live
there. Nothing deeper asks `torch.cuda` what to do.

    auto   the GPU Ray assigned to this process when there is one, else the CPU; outside Ray,
           the first visible GPU when there is one
    cpu    the CPU, even where GPUs are visible (a CPU group on a GPU node)
    cuda   the assigned (or first visible) GPU; an error, at start, where there is none

Under Ray an actor sees only the GPUs it was given (Ray sets CUDA_VISIBLE_DEVICES), so "its"
GPU is always `cuda:0` of its own view, whole or a fraction of one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from workers.weights.dtypes import parse_dtype

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """A device request this process cannot honour, said at start instead of failing mid-step."""


def resolve_device(requested: str, *, cuda_available: bool,
                   assigned_gpus: Sequence[str] | None) -> torch.device:
    """Pure: the device a process with these facts uses.

    `assigned_gpus` is what Ray gave the process (its GPU ids; empty: none), or None outside
    Ray, where every visible GPU is fair game.
    """
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device {requested!r}: use one of {', '.join(DEVICE_CHOICES)}")
    if requested == "cpu":
        return torch.device("cpu")
    has_gpu = cuda_available and (assigned_gpus is None or len(assigned_gpus) > 0)
    if requested == "auto":
        return torch.device("cuda", 0) if has_gpu else torch.device("cpu")
    if not cuda_available:
        raise DeviceError("device 'cuda' was asked for, but this process sees no CUDA GPU "
                          "(no driver, a CPU-only torch, or CUDA_VISIBLE_DEVICES is empty)")
    if assigned_gpus is not None and not assigned_gpus:
        raise DeviceError("device 'cuda' was asked for, but Ray assigned this process no GPU: "
                          "give the workers GPUs (--gpus or --gpus-per-worker)")
    return torch.device("cuda", 0)


def select_device(requested: str = "auto") -> torch.device:
    """Decide this process's device once, at start: the only place that asks torch.cuda and Ray."""
    device = resolve_device(requested, cuda_available=torch.cuda.is_available(),
                            assigned_gpus=_ray_assigned_gpus())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def resolve_dtype(requested: str | torch.dtype, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    """"auto": the checkpoint's own dtype on a GPU, float32 on a CPU (where bf16 matmuls are slow
    and fp32 is what the oracle tests compare)."""
    auto = checkpoint_dtype if device.type == "cuda" else "float32"
    return parse_dtype(requested, auto=auto)


def _ray_assigned_gpus() -> list[str] | None:
    """The GPU ids Ray gave this process, or None when it is not a Ray worker."""
    ray = sys.modules.get("ray")  # not imported → not a Ray worker; importing it costs a second
    if ray is None or not ray.is_initialized():
        return None
    if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None  # a driver (a script, a benchmark) is given nothing; it may use any GPU
    return [str(g) for g in ray.get_gpu_ids()]
