"""Choose the next token of every sequence in a batch (DESIGN.md §1 step 5).

Shapes: S sequences in the batch, R of them stochastic, V vocabulary.

Greedy rows take the argmax. Stochastic rows go temperature → top-k → top-p → min-p (the
order vLLM uses), then draw by inverse CDF over the kept tokens, sorted by probability,
with one uniform number per row.

Why one uniform number per row, hashed from (seed, step): a row's token must depend only on
its logits, its parameters and (seed, step), never on which other rows share the batch,
where the row sits in it, or how many numbers a generator handed out before. So there is
no generator state at all: the number is a pure function of (seed, step), and after a
preemption and recompute, or a retry on another worker, the same (seed, step) gives the
same number. It is computed in Python, so it is the same on every device (only the logits
themselves may differ between devices), and it costs about 3 µs a row where building a
seeded torch.Generator costs about 17 µs.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.model.sampling_params import SamplingParams

_MASK64 = 2**64 - 1


@dataclass(frozen=True)
class SampleKey:
    """Where one row's randomness comes from."""

    seed: int | None  # the request's seed; None: non-reproducible
    seq_id: int
    step: int  # tokens this sequence has generated so far


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # log_softmax of the raw logits at the chosen id, if asked


def sample(
    logits_SV: torch.Tensor, params: Sequence[SamplingParams], keys: Sequence[SampleKey]
) -> SampleOutput:
    """The next token of each row. `logits_SV` is fp32 and is not modified."""
    num_rows = logits_SV.shape[0]
    if len(params) != num_rows or len(keys) != num_rows:
        raise ValueError(
            f"got {num_rows} rows of logits, {len(params)} SamplingParams, {len(keys)} keys"
        )
    logits_SV = logits_SV.float()
    token_ids_S = logits_SV.argmax(dim=-1)

    stochastic = [i for i, p in enumerate(params) if not p.is_greedy]
    if stochastic:
        rows_R = torch.tensor(stochastic, device=logits_SV.device)
        probs_RV, order_RV = _filtered_sorted_probs(
            logits_SV[rows_R], [params[i] for i in stochastic]
        )
        uniform_R = torch.tensor(
            [_uniform(keys[i]) for i in stochastic], dtype=torch.float64
        ).to(logits_SV.device)
        token_ids_S[rows_R] = _inverse_cdf(probs_RV, order_RV, uniform_R)

    logprobs: list[float | None] = [None] * num_rows
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    if wanted:
        rows_W = torch.tensor(wanted, device=logits_SV.device)
        logprobs_WV = torch.log_softmax(logits_SV[rows_W], dim=-1)
        chosen_W = logprobs_WV.gather(1, token_ids_S[rows_W, None]).squeeze(1)
        for i, value in zip(wanted, chosen_W.tolist(), strict=True):
            logprobs[i] = value
    return SampleOutput(token_ids=token_ids_S.tolist(), logprobs=logprobs)


def sampling_probs(logits_SV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """[S, V] fp32: the distribution `sample` draws each row from (greedy rows: one-hot)."""
    logits_SV = logits_SV.float()
    probs_SV = torch.zeros_like(logits_SV)
    probs_SV.scatter_(1, logits_SV.argmax(dim=-1, keepdim=True), 1.0)
    stochastic = [i for i, p in enumerate(params) if not p.is_greedy]
    if stochastic:
        rows_R = torch.tensor(stochastic, device=logits_SV.device)
        sorted_RV, order_RV = _filtered_sorted_probs(
            logits_SV[rows_R], [params[i] for i in stochastic]
        )
        probs_SV[rows_R] = torch.zeros_like(sorted_RV).scatter_(1, order_RV, sorted_RV)
    return probs_SV


def _filtered_sorted_probs(
    logits_RV: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k, top-p and min-p, sorted in descending order.

    Returns (probs_RV, order_RV) with probs_RV[r, j] the probability of token order_RV[r, j].
    Every filter keeps a prefix of the sorted order and always keeps the top token.
    """
    device, vocab_size = logits_RV.device, logits_RV.shape[1]
    temperature_R = torch.tensor([p.temperature for p in params], device=device)
    top_k_R = torch.tensor(
        [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params], device=device
    )
    top_p_R = torch.tensor([p.top_p for p in params], device=device)
    min_p_R = torch.tensor([p.min_p for p in params], device=device)

    # stable: among equal logits the lower id comes first, as with argmax.
    sorted_RV, order_RV = torch.sort(
        logits_RV / temperature_R[:, None], dim=-1, descending=True, stable=True
    )
    position_V = torch.arange(vocab_size, device=device)
    sorted_RV = sorted_RV.masked_fill(position_V >= top_k_R[:, None], float("-inf"))

    probs_RV = torch.softmax(sorted_RV, dim=-1)
    # top-p: drop a token once the tokens before it already hold top_p of the mass. Rows
    # with top_p == 1 are skipped: rounding can push that cumulative sum to 1 early.
    mass_before_RV = probs_RV.cumsum(dim=-1) - probs_RV
    drop_RV = (mass_before_RV >= top_p_R[:, None]) & (top_p_R < 1)[:, None]
    # min-p compares with the top token's probability; renormalising does not change it.
    drop_RV |= probs_RV < min_p_R[:, None] * probs_RV[:, :1]
    sorted_RV = sorted_RV.masked_fill(drop_RV, float("-inf"))
    return torch.softmax(sorted_RV, dim=-1), order_RV


def _inverse_cdf(
    probs_RV: torch.Tensor, order_RV: torch.Tensor, uniform_R: torch.Tensor
) -> torch.Tensor:
    """Token ids: the first sorted position whose cumulative probability exceeds u·total.

    The CDF is summed in fp64: in fp32 the tail tokens (p below ~6e-8) would add nothing
    to a running sum near 1 and could never be drawn.
    """
    cdf_RV = probs_RV.double().cumsum(dim=-1)
    target_R1 = uniform_R[:, None] * cdf_RV[:, -1:]
    position_R = torch.searchsorted(cdf_RV, target_R1, right=True).squeeze(1)
    # Rounding may put the target at or past the end; fall back to the last token with
    # any probability (the positive ones are a prefix, and there is at least one).
    num_positive_R = (probs_RV > 0).sum(dim=-1)
    position_R = torch.minimum(position_R, num_positive_R - 1)
    return order_RV.gather(1, position_R[:, None]).squeeze(1)


def _uniform(key: SampleKey) -> float:
    """One number in [0, 1): a hash of (seed, step) only; unseeded rows add a process salt.

    The top 53 bits of the hash: exact in fp64, where the CDF is summed.
    """
    if key.seed is None:
        parts = (_process_salt(), key.seq_id, key.step)
    else:
        parts = (key.seed, key.step)
    return (_mix(parts) >> 11) * 2.0**-53


def _mix(parts: tuple[int, ...]) -> int:
    """A 64-bit hash of a few integers (splitmix64 finaliser, chained)."""
    state = 0
    for part in parts:
        state = ((state ^ (part & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state


@functools.cache
def _process_salt() -> int:
    """Random once per process: unseeded rows differ between processes and runs."""
    return secrets.randbits(64)
