"""The GPU attention paths that run on any device, against the plain path, on the CPU.

Prefill with a lower-right causal bias (no mask tensor) where the window cuts nothing, the
explicit mask where it does; decode through the padded batch with cuDNN excluded; and which
kernels each device gets.
"""

from __future__ import annotations

import pytest
import torch

from tests.attention_cases import random_mixed_step
from workers.model.attention import CUDA_SDPA, CUDA_TRITON, REFERENCE, kernels_for, select_kernels
from workers.model.attention_metadata import AttentionMetadata
from workers.model.cuda_sdpa_attention import decode_without_cudnn, prefill_without_cudnn
from workers.model.reference_attention import decode_reference, prefill_reference

BLOCK = 4


def random_step(seed: int, num_heads: int, num_kv_heads: int):
    return random_mixed_step(seed, num_heads, num_kv_heads, block_size=BLOCK)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [None, 3, 12, 100])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (4, 2), (8, 2)])
def test_prefill_with_causal_lower_right_equals_masked_reference(seed, window, num_heads, num_kv_heads):
    q_TQD, cache, meta = random_step(seed, num_heads, num_kv_heads)
    for chunk in meta.prefill_chunks(window):
        expected, got = torch.zeros_like(q_TQD), torch.zeros_like(q_TQD)
        prefill_reference(q_TQD, expected, chunk, cache, 0)
        # A fresh chunk: the reference above built (and cached) its mask.
        fresh = AttentionMetadata.build(meta.extents, BLOCK).prefill_chunks(window)
        fresh_chunk = next(c for c in fresh if c.rows == chunk.rows)
        prefill_without_cudnn(q_TQD, got, fresh_chunk, cache, 0)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # Where the window cuts nothing, no [L, C] mask was built.
        assert ("mask_LC" in fresh_chunk.__dict__) == (not fresh_chunk.window_covers_context)


def test_cases_cover_both_prefill_paths():
    covers = {c.window_covers_context for seed in range(4) for window in (None, 3, 12, 100)
              for c in random_step(seed, 4, 2)[2].prefill_chunks(window)}
    assert covers == {True, False}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [None, 1, 5, 100])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (4, 2), (8, 2)])
def test_decode_without_cudnn_equals_reference(seed, window, num_heads, num_kv_heads):
    q_TQD, cache, meta = random_step(seed, num_heads, num_kv_heads)
    decode = meta.decode_batch(window)
    if decode is None:
        pytest.skip("this step drew no decode token")
    expected, got = torch.zeros_like(q_TQD), torch.zeros_like(q_TQD)
    decode_reference(q_TQD, expected, decode, cache, 0)
    decode_without_cudnn(q_TQD, got, decode, cache, 0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_kernels_follow_the_device():
    assert select_kernels("cpu", triton_available=True) is REFERENCE
    assert select_kernels("cpu", triton_available=False) is REFERENCE
    assert select_kernels("cuda", triton_available=True) is CUDA_TRITON
    assert select_kernels("cuda", triton_available=False) is CUDA_SDPA
    assert kernels_for(torch.device("cpu")) is REFERENCE
