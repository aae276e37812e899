"""How a static step (a function over buffers allocated once) becomes something to replay.

`CudaGraphCapture`: the step is run once eagerly on a side stream (the warm-up: Triton compiles,
cuBLAS and NCCL set up, outside the capture where they may wait for the device), then recorded
into a CUDA graph whose replay re-launches every kernel at the same addresses. Graphs captured
by one capture share its memory pool, largest first (a smaller graph's activations fit in the
blocks the larger ones hold).

`EagerCapture`: the stand-in off CUDA. The same warm-up run, then every "replay" runs the step
again over the same buffers. It has the graph's semantics wherever the step's Python has no
effect a graph would not repeat, which is what the CPU tests of the capture paths rely on
(workers/model/cuda_graph_runner.py, workers/group/worker_graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

from workers.model.cuda_graph_runner import GraphReplay

T = TypeVar("T")


class StaticCapture(Protocol):
    def __call__(self, step: Callable[[], T]) -> Callable[[], T]: ...


class CudaGraphCapture:
    def __init__(self, device: torch.device, error_mode: str = "global") -> None:
        """`error_mode`: torch.cuda.graph's capture_error_mode ("thread_local" lets other threads of
        the process use the device while this one captures)."""
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.device = device
        self.error_mode = error_mode
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def __call__(self, step: Callable[[], T]) -> GraphReplay:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            step()  # warm-up, outside the capture
        graph = torch.cuda.CUDAGraph()
        # Synchronizes the device first.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode=self.error_mode):
            output = step()
        current.wait_stream(self.stream)
        return GraphReplay(graph, output)


class EagerCapture:
    def __call__(self, step: Callable[[], T]) -> Callable[[], T]:
        step()  # the warm-up a graph capture runs: the same collectives, in the same order
        return step
