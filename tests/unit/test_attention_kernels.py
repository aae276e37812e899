"""The GPU attention paths that run on any device, against the plain path, on the CPU.

Prefill with a lower-right causal bias (no mask tensor) where the window cuts nothing, the
explicit mask where it does; decode through the padded batch with cuDNN excluded; and which
kernels each device gets.
"""

from __future__ import annotations

import random

import pytest
import torch

from workers.attention import CUDA_SDPA, CUDA_TRITON, REFERENCE, kernels_for, select_kernels
from workers.attention_metadata import AttentionMetadata, SeqExtent
from workers.config import ModelConfig
from workers.cuda_sdpa_attention import decode_without_cudnn, prefill_without_cudnn
from workers.kv_cache import KVCache
from workers.reference_attention import decode_reference, prefill_reference

BLOCK = 4


def random_step(seed: int, num_heads: int, num_kv_heads: int, head_dim: int = 8):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(vocab_size=8, hidden_size=num_heads * head_dim, intermediate_size=8,
                      num_hidden_layers=1, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      num_local_experts=2, num_experts_per_tok=1, head_dim=head_dim)
    blocks = list(range(120))
    rng.shuffle(blocks)
    extents, T = [], 0
    for _ in range(6):
        start = rng.choice([0, 0, rng.randint(1, 30)])
        query = rng.choice([1, rng.randint(2, 12)])
        need = -(-(start + query) // BLOCK)
        extents.append(SeqExtent(start, query, tuple(blocks[:need])))
        blocks = blocks[need:]
        T += query
    cache = KVCache(cfg, 120, BLOCK)
    cache.k_BPGD[0].copy_(torch.randn(cache.k_BPGD[0].shape, generator=gen))
    cache.v_BPGD[0].copy_(torch.randn(cache.v_BPGD[0].shape, generator=gen))
    q_TQD = torch.randn(T, num_heads, head_dim, generator=gen)
    return q_TQD, cache, AttentionMetadata.build(extents, BLOCK)


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
