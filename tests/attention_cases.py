"""Random paged-cache steps for checking attention kernels against the plain path.

Shared by the Triton interpreter check (CPU, tests/unit) and the CUDA checks (tests/gpu).
Shapes: T tokens of the step, Q query heads, G key/value heads, D head dim.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from workers.model.attention_metadata import AttentionMetadata, SeqExtent
from workers.model.kv_cache import KVCache
from workers.weights.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# fp32: the kernel's own rounding only. Half precision: the two paths round p (and the output)
# at different points; values are O(1).
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}


@dataclass(frozen=True)
class DecodeCase:
    seed: int
    block_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    dtype: str

    @property
    def id(self) -> str:
        return (f"s{self.seed}-P{self.block_size}-Q{self.num_heads}G{self.num_kv_heads}-D{self.head_dim}"
                f"-w{self.sliding_window}-{self.dtype}")


def decode_cases() -> list[DecodeCase]:
    """GQA groups 1/2/4; windows narrower and wider than the contexts; block sizes 4 and 16."""
    heads = [(2, 2), (4, 2), (8, 2)]
    windows = [None, 1, 7, 33, 200]
    grid = [(P, qg, w, "float32") for P, qg, w in itertools.product([4, 16], heads, windows)]
    grid += [(P, qg, w, "bfloat16") for P, qg, w in itertools.product([4, 16], heads, [None, 7])]
    cases = [DecodeCase(seed, P, Q, G, 12, w, dtype) for seed, (P, (Q, G), w, dtype) in enumerate(grid)]
    # A power-of-two head dim (no padding) and fp16, once each.
    cases.append(DecodeCase(100, 16, 8, 2, 16, None, "float32"))
    cases.append(DecodeCase(101, 4, 4, 1, 16, 9, "float16"))
    return cases


def random_cache(num_heads: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str, gen: torch.Generator) -> KVCache:
    """A one-layer paged cache full of random keys and values."""
    cfg = ModelConfig(
        vocab_size=8, hidden_size=num_heads * head_dim, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, num_local_experts=2,
        num_experts_per_tok=1, head_dim=head_dim,
    )
    cache = KVCache(cfg, num_blocks, block_size, dtype=dtype, device=device)
    cache.k_BPGD[0].copy_(torch.randn(cache.k_BPGD[0].shape, generator=gen))
    cache.v_BPGD[0].copy_(torch.randn(cache.v_BPGD[0].shape, generator=gen))
    return cache


def random_mixed_step(seed: int, num_heads: int, num_kv_heads: int, head_dim: int = 8, block_size: int = 4,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Six sequences, each a decode token or a prefill chunk (from the start or after a context).

    Returns (q_TQD, kv_cache, meta) with the metadata built for `device`.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 120
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    extents, T = [], 0
    for _ in range(6):
        start = rng.choice([0, 0, rng.randint(1, 30)])
        query = rng.choice([1, rng.randint(2, 12)])
        need = -(-(start + query) // block_size)
        extents.append(SeqExtent(start, query, tuple(blocks[:need])))
        blocks = blocks[need:]
        T += query
    cache = random_cache(num_heads, num_kv_heads, head_dim, num_blocks, block_size, dtype, device, gen)
    q_TQD = torch.randn(T, num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    return q_TQD, cache, AttentionMetadata.build(extents, block_size, device=device)


@dataclass
class DecodeStep:
    """One step's query, cache and metadata, with the decode rows and the others told apart."""

    q_TQD: torch.Tensor
    kv_cache: KVCache
    meta: AttentionMetadata
    decode_rows: list[int]
    other_rows: list[int]


def random_decode_step(case: DecodeCase, device: torch.device | str = "cpu") -> DecodeStep:
    """Decode tokens with contexts 1..70 mixed with prefill chunks, over shuffled block tables."""
    rng = random.Random(case.seed)
    gen = torch.Generator().manual_seed(case.seed)
    P = case.block_size
    contexts = [1, 2, P, P + 1, 31, 32, 33, 64, 65, 70] + [rng.randint(1, 70) for _ in range(4)]
    rng.shuffle(contexts)
    extents, decode_rows, other_rows, row = [], [], [], 0
    needs = [-(-c // P) + rng.randint(0, 1) for c in contexts]
    num_blocks = sum(needs) + 2 * (-(-70 // P)) + 1
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    for i, ctx in enumerate(contexts):
        if i % 4 == 3:  # a prefill chunk between decode tokens: decode rows are not contiguous
            query = min(ctx, 3) if ctx > 1 else 1
            if query > 1:
                need = -(-ctx // P)
                extents.append(SeqExtent(ctx - query, query, tuple(blocks[:need])))
                blocks = blocks[need:]
                other_rows.extend(range(row, row + query))
                row += query
                continue
        extents.append(SeqExtent(ctx - 1, 1, tuple(blocks[:needs[i]])))
        blocks = blocks[needs[i]:]
        decode_rows.append(row)
        row += 1
    dtype = DTYPES[case.dtype]
    cache = random_cache(case.num_heads, case.num_kv_heads, case.head_dim, num_blocks, P, dtype, device, gen)
    q_TQD = torch.randn(row, case.num_heads, case.head_dim, generator=gen).to(device=device, dtype=dtype)
    meta = AttentionMetadata.build(extents, P, device=device)
    return DecodeStep(q_TQD, cache, meta, decode_rows, other_rows)
