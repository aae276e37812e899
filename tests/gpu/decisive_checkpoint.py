"""A tiny random Mixtral whose greedy choices are decisive, for bf16 comparisons.

Two bf16 implementations round activations at different places, so their logits differ by about
0.05 on the tiny random configs (measured on the CPU against transformers), while the gap between
a random model's two best tokens is often smaller than that: greedy ids of such a model say
nothing about either implementation. Here the LM head is a permutation of the embedding and every
layer's output projections (attention's o_proj and the experts' down projections) are scaled down,
so the residual stream still carries the token's own embedding and the logits have one clear
winner at most steps. The layers keep steering some of them (with a smaller gap), which is why
tests still pick the decisive prompts by measuring the gap, not by assuming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.model_helpers import save_hf_mixtral

LAYER_OUTPUT_SCALE = 0.1  # about 5% of greedy steps still differ from the bare permutation


def save_decisive_mixtral(out_dir: Path, seed: int = 0, **overrides):
    """save_hf_mixtral's model, made decisive as above and saved again over it; returns the HF model."""
    model = save_hf_mixtral(out_dir, seed=seed, **overrides)
    vocab = model.config.vocab_size
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embed_tokens.weight[perm])
        for name, p in model.named_parameters():
            # transformers 5 fuses the experts (experts.down_proj); 4.x names them w2.
            if name.endswith(("o_proj.weight", "experts.down_proj", ".w2.weight")):
                p.mul_(LAYER_OUTPUT_SCALE)
    model.save_pretrained(out_dir)
    return model


def top2_gaps(logits_TV: torch.Tensor) -> torch.Tensor:
    """Each row's best logit minus its second best, in fp32; [T]."""
    return kth_gaps(logits_TV, 1)


def kth_gaps(logits_TN: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k-th largest value minus its (k+1)-th, in fp32: how firmly a top-k choice is made; [T]."""
    top = logits_TN.float().topk(k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]
