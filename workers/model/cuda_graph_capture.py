"""Capture the decode step's CUDA graphs at start-up, within a time and memory budget.

Largest bucket first, all graphs in one memory pool: a smaller graph's activations fit in the
blocks the larger ones hold, so the pool grows by about the largest graph only. Each bucket is
first run once eagerly on the capture stream, on the static buffers' inert contents (every
row padding, writing only the scratch block): Triton compiles its kernel and cuBLAS sets up
its workspace there, outside the capture, where they may wait for the device. A log line per
bucket shows progress; when the budget (cuda_graph_budget.py) is spent the remaining buckets
are skipped and the log says which and why.

Only on CUDA with the Triton paged-decode kernel: without it decode attention gathers a dense
padded batch whose width, fixed at capture, would be the longest context the model allows.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

import torch

from workers.model.attention import CUDA_TRITON, kernels_for
from workers.model.cuda_graph_buckets import DEFAULT_BUCKET_SIZES, decode_buckets
from workers.model.cuda_graph_budget import CaptureBudget
from workers.model.cuda_graph_inputs import DecodeGraphInputs
from workers.model.cuda_graph_runner import (
    DecodeGraphRunner,
    GraphReplay,
    StaticStep,
    forward_logits,
    graph_shape,
)
from workers.model.kv_cache import KVCache
from workers.model.mixtral import MixtralModel
from workers.model.static_capture import CudaGraphCapture

log = logging.getLogger(__name__)

_MIB = 1 << 20
DEFAULT_BUDGET = CaptureBudget()


def use_decode_graphs(device: torch.device, enforce_eager: bool) -> bool:
    """Whether an engine on `device` captures decode graphs: on CUDA unless told not to
    (--enforce-eager) or the Triton kernel is missing (then it says so)."""
    if device.type != "cuda" or enforce_eager:
        return False
    if kernels_for(device) is not CUDA_TRITON:
        log.warning("decode CUDA graphs off: the Triton paged-decode kernel does not load here")
        return False
    return True


@torch.inference_mode()
def capture_decode_graphs(model: MixtralModel, kv_cache: KVCache, *, scratch_block: int, max_num_seqs: int,
                          budget: CaptureBudget = DEFAULT_BUDGET,
                          sizes: Sequence[int] = DEFAULT_BUCKET_SIZES) -> DecodeGraphRunner:
    """One graph per bucket of `decode_buckets(max_num_seqs, sizes)`, as many as the budget allows
    (the largest always). `scratch_block`: a block of `kv_cache` that no sequence is ever given."""
    device = kv_cache.k_BPGD[0].device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; the cache is on {device}")
    buckets = decode_buckets(max_num_seqs, sizes)
    inputs = DecodeGraphInputs(graph_shape(model, kv_cache, buckets[-1], scratch_block), device)
    capture = CudaGraphCapture(device)  # one memory pool for every bucket
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base_bytes = torch.cuda.memory_reserved(device)
    start = time.perf_counter()
    order = sorted(buckets, reverse=True)
    steps: dict[int, StaticStep] = {}
    for i, bucket in enumerate(order):
        used = max(0, torch.cuda.memory_reserved(device) - base_bytes)
        reason = budget.spent(time.perf_counter() - start, used) if steps else None
        if reason is not None:
            log.warning("decode CUDA graphs: skipping batch sizes %s: %s; smaller steps pad up to %d",
                        order[i:], reason, min(steps))
            break
        try:
            steps[bucket] = _capture_bucket(model, kv_cache, inputs, bucket, capture)
        except RuntimeError as e:
            raise RuntimeError(f"capturing the decode step at batch size {bucket} failed: {e} "
                               "(--enforce-eager runs without CUDA graphs)") from e
        log.info("decode CUDA graph %d/%d: batch size %d captured (%.1f s, %.0f MiB so far)",
                 i + 1, len(order), bucket, time.perf_counter() - start,
                 max(0, torch.cuda.memory_reserved(device) - base_bytes) / _MIB)
    log.info("decode CUDA graphs: batch sizes %s in %.1f s", sorted(steps), time.perf_counter() - start)
    return DecodeGraphRunner(inputs, steps)


def _capture_bucket(model: MixtralModel, kv_cache: KVCache, inputs: DecodeGraphInputs, bucket: int,
                    capture: CudaGraphCapture) -> GraphReplay:
    return capture(functools.partial(forward_logits, model, kv_cache, inputs, bucket))
