"""tests/model_helpers.py's prefill and greedy loops, with the KV cache and step metadata on a device.

The model must already live on `device` (load_local_model(..., device=device)); every tensor a
step touches is created there, as the engine's runner does.
"""

from __future__ import annotations

import torch

from workers.model.attention_metadata import AttentionMetadata, SeqExtent
from workers.model.kv_cache import KVCache
from workers.model.mixtral import MixtralModel


def prefill_logits(model: MixtralModel, ids: list[int], device: torch.device,
                   block_size: int = 4) -> torch.Tensor:
    """fp32 logits of every position of one sequence, from one prefill; [len(ids), V] on `device`."""
    n_blocks = -(-len(ids) // block_size)
    cache = KVCache(model.cfg, num_blocks=n_blocks + 1, block_size=block_size, dtype=model.dtype,
                    device=device)
    table = tuple(reversed(range(1, n_blocks + 1)))  # shuffled: paging bugs cannot hide
    meta = AttentionMetadata.build([SeqExtent(0, len(ids), table)], block_size, device=device)
    return model.logits(model.forward(torch.tensor(ids, device=device), meta, cache))


def greedy_generate(model: MixtralModel, prompt: list[int], max_new_tokens: int, device: torch.device,
                    block_size: int = 4) -> list[int]:
    """Prefill, then one decode step per token over the paged cache: the decode kernels run too."""
    n_blocks = -(-(len(prompt) + max_new_tokens) // block_size)
    cache = KVCache(model.cfg, num_blocks=n_blocks, block_size=block_size, dtype=model.dtype, device=device)
    table = tuple(range(n_blocks))
    start, new, out = 0, list(prompt), []
    while len(out) < max_new_tokens:
        meta = AttentionMetadata.build([SeqExtent(start, len(new), table)], block_size, device=device)
        hidden = model.forward(torch.tensor(new, device=device), meta, cache)
        next_id = int(model.logits(hidden[-1:]).argmax(-1))
        start += len(new)
        new = [next_id]
        out.append(next_id)
    return out
