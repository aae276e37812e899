"""Our Mixtral equals transformers' MixtralForCausalLM on the same checkpoint (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import greedy_generate, prefill_logits, save_hf_mixtral
from workers.model.loader import load_local_model

CONFIGS = {
    "mha_gqa1": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa2_sliding_window": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=7),
    "gqa4_6experts_top3": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                               num_local_experts=6, num_experts_per_tok=3),
    "odd_sizes_head_dim": dict(hidden_size=45, intermediate_size=37, num_attention_heads=5,
                               num_key_value_heads=5, head_dim=10, num_local_experts=3,
                               num_experts_per_tok=1),
    "sharded_3_layers": dict(num_hidden_layers=3, max_shard_size="40KB"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    overrides = dict(CONFIGS[request.param])
    shard = overrides.pop("max_shard_size", None)
    out = tmp_path_factory.mktemp(request.param)
    hf = save_hf_mixtral(out, max_shard_size=shard, **overrides)
    if shard:
        assert (out / "model.safetensors.index.json").exists(), "expected a sharded checkpoint"
    return hf, load_local_model(out)


def test_logits_equal_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (19,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = prefill_logits(ours, ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


PROMPTS = [[5, 17, 3, 99, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [64]]


def test_greedy_generation_equals_transformers(pair):
    hf, ours = pair
    for prompt in PROMPTS:
        got = greedy_generate(ours, prompt, 32)
        # Teacher-forced oracle: HF's own full forward over prompt + our tokens must pick
        # each of our tokens.
        with torch.no_grad():
            chain = hf(torch.tensor([prompt + got])).logits[0].argmax(-1).tolist()
        assert chain[len(prompt) - 1:-1] == got
        with torch.no_grad():
            # eos_token_id=None: generate must neither stop at nor suppress EOS, like our loop.
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert got == ref
