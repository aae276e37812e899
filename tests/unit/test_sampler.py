"""The sampler: greedy, filters, per-seed reproducibility, the distribution, logprobs.

Shapes: S rows, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch

from workers.model.sampler import SampleKey, SampleOutput, sample, sampling_probs
from workers.model.sampling_params import SamplingParams

V = 50


def random_logits(num_rows: int, vocab_size: int = V, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=generator) * 2


def keys_for(params: list[SamplingParams], step: int = 0) -> list[SampleKey]:
    return [SampleKey(seed=p.seed, seq_id=i, step=step) for i, p in enumerate(params)]


def run(logits_SV: torch.Tensor, params: list[SamplingParams], step: int = 0) -> SampleOutput:
    return sample(logits_SV, params, keys_for(params, step))


def reference_probs(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, float64, written from the definitions rather than from the sampler."""
    probs = torch.softmax(logits_V.double() / p.temperature, dim=-1)
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    kept = order[: p.top_k] if p.top_k > 0 else order
    mass = sum(probs[i].item() for i in kept)
    if p.top_p < 1:
        nucleus, total = [], 0.0
        for i in kept:
            nucleus.append(i)
            total += probs[i].item() / mass
            if total >= p.top_p:
                break
        kept = nucleus
    top = probs[kept[0]].item()
    kept = [i for i in kept if probs[i].item() >= p.min_p * top]
    out = torch.zeros_like(probs)
    out[kept] = probs[kept] / probs[kept].sum()
    return out.float()


# --- greedy and filters that reduce to greedy ------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(16)
    out = run(logits, [SamplingParams(temperature=0.0)] * 16)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 16


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1, seed=1),
        SamplingParams(top_p=1e-6, seed=2),
        SamplingParams(min_p=1.0, seed=3),
        SamplingParams(top_k=1),  # unseeded
    ],
    ids=["top_k=1", "top_p tiny", "min_p=1", "top_k=1 unseeded"],
)
def test_filters_that_keep_one_token_are_greedy(params):
    logits = random_logits(32, seed=5)
    for step in range(3):
        assert run(logits, [params] * 32, step).token_ids == logits.argmax(dim=-1).tolist()


def test_logits_are_not_modified():
    logits = random_logits(4)
    before = logits.clone()
    run(logits, [SamplingParams(seed=1, top_k=5, top_p=0.5, min_p=0.1, temperature=0.7)] * 4)
    assert torch.equal(logits, before)


def test_masked_tokens_are_never_chosen():
    logits = random_logits(1, vocab_size=8).repeat(400, 1)
    logits[:, ::2] = float("-inf")
    params = [SamplingParams(seed=s, temperature=5.0) for s in range(400)]
    assert all(t % 2 == 1 for t in run(logits, params).token_ids)


# --- filtered distribution vs a slow reference ----------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 1.7])
@pytest.mark.parametrize("top_k", [-1, 1, 3, 50, 200])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3])
@pytest.mark.parametrize("min_p", [0.0, 0.1])
def test_sampling_probs_match_reference(temperature, top_k, top_p, min_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = random_logits(3, seed=11)
    got = sampling_probs(logits, [params] * 3)
    for row in range(3):
        want = reference_probs(logits[row], params)
        assert torch.equal(got[row] > 0, want > 0)
        torch.testing.assert_close(got[row], want, atol=1e-6, rtol=1e-5)


def test_sampling_probs_greedy_rows_are_one_hot():
    logits = random_logits(2)
    probs = sampling_probs(logits, [SamplingParams(temperature=0.0), SamplingParams()])
    assert probs[0].argmax() == logits[0].argmax() and probs[0].sum() == 1 and probs[0].max() == 1
    torch.testing.assert_close(probs[1], torch.softmax(logits[1], dim=-1))


# --- reproducibility ------------------------------------------------------------------


def test_same_seed_same_tokens_whatever_the_batch():
    """A seeded row alone, then at other positions among 7 random rows, over 20 steps."""
    target = SamplingParams(seed=1234, temperature=1.0, top_p=0.95)
    others_pool = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=7),
        SamplingParams(seed=None, top_k=5),
        SamplingParams(seed=99, temperature=0.5, min_p=0.1),
    ]
    for step in range(20):
        logits_V = random_logits(1, seed=1000 + step)[0]
        alone = sample(logits_V[None], [target], [SampleKey(1234, seq_id=0, step=step)])
        for position in (0, 3, 7):
            batch_params, keys, rows = [], [], []
            for r in range(8):
                if r == position:
                    batch_params.append(target)
                    keys.append(SampleKey(1234, seq_id=555, step=step))
                    rows.append(logits_V)
                else:
                    other = others_pool[(r + step) % len(others_pool)]
                    batch_params.append(other)
                    keys.append(SampleKey(other.seed, seq_id=r, step=step + r))
                    rows.append(random_logits(1, seed=step * 100 + r)[0])
            out = sample(torch.stack(rows), batch_params, keys)
            assert out.token_ids[position] == alone.token_ids[0], (step, position)


def test_same_seed_and_step_same_token_on_repeat():
    logits = random_logits(1)
    params = [SamplingParams(seed=42)]
    key = [SampleKey(42, seq_id=3, step=17)]
    first = sample(logits, params, key).token_ids
    sample(logits, [SamplingParams(seed=42)] * 1, [SampleKey(42, seq_id=3, step=16)])
    assert sample(logits, params, key).token_ids == first  # no state carried between calls


def test_different_seeds_differ():
    logits = torch.zeros(1, V)  # uniform: two seeds agree on 1/V of the steps
    tokens = {
        seed: [run(logits, [SamplingParams(seed=seed)], step).token_ids[0] for step in range(200)]
        for seed in (1, 2)
    }
    agree = sum(a == b for a, b in zip(tokens[1], tokens[2], strict=True))
    assert agree < 20
    assert len(set(tokens[1])) > V // 2  # and the steps of one seed differ from each other


def test_extreme_seeds_are_accepted():
    logits = random_logits(2)
    params = [SamplingParams(seed=2**64 - 1), SamplingParams(seed=-(2**63))]
    out = run(logits, params)
    assert all(0 <= t < V for t in out.token_ids)


def test_unseeded_rows_vary():
    logits = torch.zeros(64, V)
    out = run(logits, [SamplingParams()] * 64)
    assert len(set(out.token_ids)) > 10


# --- the distribution -----------------------------------------------------------------


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a token with zero probability"
    return (((counts[support] - expected[support]) ** 2) / expected[support]).sum().item()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.2),
    ],
    ids=["temperature=1", "top_k", "top_p", "min_p"],
)
def test_empirical_distribution_matches(params):
    """20,000 draws (seeds 0..N-1, step 0) over a vocabulary of 6."""
    num_draws, vocab = 20_000, 6
    logits_V = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    logits = logits_V.repeat(num_draws, 1)
    params_list = [
        SamplingParams(
            seed=s, temperature=params.temperature, top_k=params.top_k,
            top_p=params.top_p, min_p=params.min_p,
        )
        for s in range(num_draws)
    ]
    tokens = torch.tensor(run(logits, params_list).token_ids)
    counts = torch.bincount(tokens, minlength=vocab).double()
    probs = sampling_probs(logits_V[None], [params]).double()[0]
    if params.temperature == 1.0 and params.min_p == 0:
        softmax_V = torch.softmax(logits_V.double(), dim=-1)
        torch.testing.assert_close(probs, softmax_V, atol=1e-6, rtol=0)
    # df <= 5: P(chi2 > 25) < 2e-4 for an honest sampler (and the seeds are fixed).
    assert chi_square(counts, probs) < 25


def test_steps_of_one_seed_follow_the_distribution():
    """One seed over 5,000 steps (as rows of one batch: the key, not the row, decides)."""
    num_steps = 5000
    logits_V = torch.tensor([0.0, 1.0, 2.0])
    params = [SamplingParams(seed=2024)] * num_steps
    keys = [SampleKey(2024, seq_id=0, step=step) for step in range(num_steps)]
    tokens = sample(logits_V.repeat(num_steps, 1), params, keys).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=3).double()
    assert chi_square(counts, torch.softmax(logits_V.double(), dim=-1)) < 20


# --- logprobs -------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_at_the_chosen_id():
    logits = random_logits(6)
    params = [
        SamplingParams(temperature=0.0, logprobs=True),
        SamplingParams(seed=1, temperature=0.5, top_k=3, logprobs=True),
        SamplingParams(seed=2),
        SamplingParams(seed=3, top_p=0.5, logprobs=True),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=None, temperature=2.0, logprobs=True),
    ]
    out = run(logits, params)
    log_softmax = torch.log_softmax(logits, dim=-1)
    for row, p in enumerate(params):
        if p.logprobs:
            want = log_softmax[row, out.token_ids[row]].item()
            assert math.isclose(out.logprobs[row], want, rel_tol=1e-6, abs_tol=1e-6)
        else:
            assert out.logprobs[row] is None


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError):
        sample(random_logits(2), [SamplingParams()], [SampleKey(None, 0, 0)])


def test_empty_batch():
    out = sample(torch.empty(0, V), [], [])
    assert out == SampleOutput(token_ids=[], logprobs=[])
