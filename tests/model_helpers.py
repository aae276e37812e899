"""Helpers for tests that compare our model with transformers' MixtralForCausalLM."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.model.attention_metadata import AttentionMetadata, SeqExtent
from workers.model.kv_cache import KVCache
from workers.model.mixtral import MixtralModel


def save_hf_mixtral(out_dir: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """A tiny random transformers Mixtral, saved with save_pretrained; returns the HF model."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)
    base.update(overrides)
    model = MixtralForCausalLM(MixtralConfig(**base)).eval()
    # The oracle runs HF's plain per-expert loop: its grouped_mm kernel needs 16-byte-aligned
    # strides, which the odd-sized configs below do not have.
    model.set_experts_implementation("eager")
    # Random init gives tiny weights; scale up so routing and attention are not near-uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return model


def prefill_logits(model: MixtralModel, ids: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits of every position of one sequence, computed in one prefill."""
    n_blocks = -(-len(ids) // block_size)
    cache = KVCache(model.cfg, num_blocks=n_blocks + 1, block_size=block_size, dtype=model.dtype)
    # A shuffled block table, so paging bugs cannot hide behind an identity layout.
    table = tuple(reversed(range(1, n_blocks + 1)))
    meta = AttentionMetadata.build([SeqExtent(0, len(ids), table)], block_size)
    return model.logits(model.forward(torch.tensor(ids), meta, cache))


def greedy_generate(model: MixtralModel, prompt: list[int], max_new_tokens: int,
                    block_size: int = 4) -> list[int]:
    """A plain prefill-then-decode loop over the paged cache (the engine does this for real)."""
    total = len(prompt) + max_new_tokens
    n_blocks = -(-total // block_size)
    cache = KVCache(model.cfg, num_blocks=n_blocks, block_size=block_size, dtype=model.dtype)
    table = tuple(range(n_blocks))
    ids = list(prompt)
    start, new = 0, list(prompt)
    out: list[int] = []
    while len(out) < max_new_tokens:
        meta = AttentionMetadata.build([SeqExtent(start, len(new), table)], block_size)
        hidden = model.forward(torch.tensor(new), meta, cache)
        next_id = int(model.logits(hidden[-1:]).argmax(-1))
        start += len(new)
        new = [next_id]
        ids.append(next_id)
        out.append(next_id)
    return out
