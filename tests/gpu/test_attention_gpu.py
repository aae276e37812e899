"""Attention on CUDA against the plain path on CUDA (run by `make test-gpu`; skipped without CUDA).

The Triton paged decode kernel (compiled for the GPU, not interpreted), the SDPA prefill with a
lower-right causal bias and cuDNN excluded, the decode fallback without Triton, the step
metadata copied to the device, and the decode kernel captured in a CUDA graph and replayed on
new inputs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from tests.attention_cases import TOLERANCE, DecodeCase, decode_cases, random_decode_step, random_mixed_step
from workers.model.attention import CUDA_SDPA, CUDA_TRITON, AttentionWeights, attention, kernels_for
from workers.model.attention_metadata import AttentionMetadata
from workers.model.cuda_sdpa_attention import decode_without_cudnn, prefill_without_cudnn
from workers.model.reference_attention import decode_reference, prefill_reference
from workers.model.rope import RotaryEmbedding

pytestmark = pytest.mark.gpu

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed beside this CUDA torch")
# Mixtral's own shape: 32 query heads over 8 key/value heads of 128, block 16, contexts to 70.
MIXTRAL_LIKE = [DecodeCase(200, 16, 32, 8, 128, None, "bfloat16"),
                DecodeCase(201, 16, 32, 8, 128, 40, "bfloat16"),
                DecodeCase(202, 16, 32, 8, 128, None, "float32")]
CASES = decode_cases() + MIXTRAL_LIKE


@pytest.fixture
def cuda(cuda_device) -> torch.device:
    """conftest's device (or its skip with the reason), fp32 matmuls in full fp32."""
    return cuda_device


def run_decode(kernel, step, window):
    out = torch.full_like(step.q_TQD, 7.0)
    kernel(step.q_TQD, out, step.meta.decode_batch(window), step.kv_cache, 0)
    return out


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_triton_decode_equals_reference(cuda, case):
    step = random_decode_step(case, cuda)
    expected = run_decode(decode_reference, step, case.sliding_window)
    got = run_decode(CUDA_TRITON.decode, step, case.sliding_window)
    rows = step.decode_rows
    torch.testing.assert_close(got[rows].float(), expected[rows].float(), atol=TOLERANCE[case.dtype], rtol=0)
    assert (got[step.other_rows] == 7.0).all(), "the kernel wrote rows that are not decode tokens"


@pytest.mark.parametrize("case", CASES[::3], ids=[c.id for c in CASES[::3]])
def test_decode_without_cudnn_equals_reference(cuda, case):
    step = random_decode_step(case, cuda)
    expected = run_decode(decode_reference, step, case.sliding_window)
    got = run_decode(decode_without_cudnn, step, case.sliding_window)
    rows = step.decode_rows
    torch.testing.assert_close(got[rows].float(), expected[rows].float(), atol=TOLERANCE[case.dtype], rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [None, 3, 12, 100])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 8), (8, 2, 64), (32, 8, 128)])
def test_prefill_without_cudnn_equals_reference(cuda, dtype, window, num_heads, num_kv_heads, head_dim):
    for seed in range(3):
        q_TQD, cache, meta = random_mixed_step(seed, num_heads, num_kv_heads, head_dim, block_size=16,
                                               dtype=getattr(torch, dtype), device=cuda)
        fresh = AttentionMetadata.build(meta.extents, 16, device=cuda).prefill_chunks(window)
        for chunk, fresh_chunk in zip(meta.prefill_chunks(window), fresh, strict=True):
            expected, got = torch.zeros_like(q_TQD), torch.zeros_like(q_TQD)
            prefill_reference(q_TQD, expected, chunk, cache, 0)
            prefill_without_cudnn(q_TQD, got, fresh_chunk, cache, 0)
            torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype], rtol=0)
            assert ("mask_LC" in fresh_chunk.__dict__) == (not fresh_chunk.window_covers_context)


@pytest.mark.parametrize("seed", range(5))
def test_metadata_on_cuda_equals_cpu(cuda, seed):
    _, _, meta_cpu = random_mixed_step(seed, 4, 2)
    meta = AttentionMetadata.build(meta_cpu.extents, meta_cpu.block_size, device=cuda)
    assert meta.device == cuda
    assert torch.equal(meta.positions_T.cpu(), meta_cpu.positions_T)
    assert torch.equal(meta.slot_mapping_T.cpu(), meta_cpu.slot_mapping_T)
    for window in (None, 3):
        d, d_cpu = meta.decode_batch(window), meta_cpu.decode_batch(window)
        assert (d is None) == (d_cpu is None)
        if d is not None:
            for name in ("rows_S", "block_tables_SB", "context_lens_S", "slots_SC", "mask_SC"):
                t = getattr(d, name)
                assert t.device == cuda, name
                assert torch.equal(t.cpu(), getattr(d_cpu, name)), name
        for c, c_cpu in zip(meta.prefill_chunks(window), meta_cpu.prefill_chunks(window), strict=True):
            assert c.rows == c_cpu.rows
            assert torch.equal(c.slots_C.cpu(), c_cpu.slots_C)
            assert torch.equal(c.mask_LC.cpu(), c_cpu.mask_LC)


def test_cuda_tensors_get_the_cuda_kernels(cuda):
    assert kernels_for(cuda) is (CUDA_TRITON if HAS_TRITON else CUDA_SDPA)


@needs_triton
@pytest.mark.parametrize("window", [None, 9])
def test_triton_decode_replays_in_a_cuda_graph(cuda, window):
    """Captured once, replayed after the step's inputs changed in place: no host value baked in."""
    from workers.model.paged_attention import paged_decode_attention

    step = random_decode_step(DecodeCase(300, 16, 8, 2, 64, window, "bfloat16"), cuda)
    decode = step.meta.decode_batch(window)
    k, v = step.kv_cache.k_BPGD[0], step.kv_cache.v_BPGD[0]
    q_TQD, out_TQD = step.q_TQD.clone(), torch.zeros_like(step.q_TQD)

    def launch():
        paged_decode_attention(q_TQD, out_TQD, decode.rows_S, k, v, decode.block_tables_SB,
                               decode.context_lens_S, window)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()

    gen = torch.Generator(device=cuda).manual_seed(1)
    full_lens = decode.context_lens_S.clone()
    for shrink in (0, 1, 5):
        q_TQD.copy_(torch.randn(q_TQD.shape, generator=gen, device=cuda))
        # Shorter contexts over the same tables: the keys the replay must read change.
        new_lens = (full_lens - shrink).clamp(min=1)
        decode.context_lens_S.copy_(new_lens)
        graph.replay()
        now = replace(decode, context_lens_S=new_lens.clone())
        expected = torch.zeros_like(q_TQD)
        decode_reference(q_TQD, expected, now, step.kv_cache, 0)
        rows = step.decode_rows
        torch.testing.assert_close(out_TQD[rows].float(), expected[rows].float(), atol=TOLERANCE["bfloat16"],
                                   rtol=0)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_on_cuda_equals_cpu(cuda, window):
    """The whole layer, projections and cache writes included, on a mixed step in fp32."""
    num_heads, num_kv_heads, head_dim, hidden = 8, 2, 16, 64
    q_cpu, cache_cpu, meta_cpu = random_mixed_step(7, num_heads, num_kv_heads, head_dim)
    _, cache_gpu, meta_gpu = random_mixed_step(7, num_heads, num_kv_heads, head_dim, device=cuda)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen) * 0.2 for shape in
               [(num_heads * head_dim, hidden), (num_kv_heads * head_dim, hidden),
                (num_kv_heads * head_dim, hidden), (hidden, num_heads * head_dim)]]
    x_TH = torch.randn(q_cpu.shape[0], hidden, generator=gen)
    outs, caches = [], []
    for device, cache, meta in (("cpu", cache_cpu, meta_cpu), (cuda, cache_gpu, meta_gpu)):
        w = AttentionWeights(*(t.to(device) for t in weights))
        rope = RotaryEmbedding(head_dim, 10000.0, device=device)
        outs.append(attention(x_TH.to(device), w, 0, meta, cache, rope.cos_sin(meta.positions_T),
                              num_heads, num_kv_heads, head_dim, window).cpu())
        caches.append(cache.k_BPGD[0].cpu())
    torch.testing.assert_close(caches[1], caches[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
