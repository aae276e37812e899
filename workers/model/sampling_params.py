"""How one request wants its tokens chosen.

A frozen dataclass, validated when built: a bad field raises `SamplingParamsError` (a
`ValueError`) whose message starts with the field name and whose `field` attribute names
it, so the gateway can turn it into an HTTP 400 with `param` set.
Pure Python (no torch): the scheduler carries it and the sampler reads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# Below this temperature we pick the argmax: dividing logits by a near-zero temperature
# overflows, and the distribution is one-hot anyway (vLLM uses the same bound).
GREEDY_TEMPERATURE = 1e-5

# torch.Generator.manual_seed accepts exactly this range.
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1


class SamplingParamsError(ValueError):
    """One invalid sampling field; `field` is its name (the OpenAI error's `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 is off
    top_k: int = -1  # -1 or 0 is off
    min_p: float = 0.0  # fraction of the top token's probability; 0 is off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _fail("max_tokens", "must be an integer >= 1", self.max_tokens)
        self._set_float("temperature", lambda t: t >= 0, "must be a finite number >= 0")
        self._set_float("top_p", lambda p: 0 < p <= 1, "must be in (0, 1]")
        self._set_float("min_p", lambda p: 0 <= p <= 1, "must be in [0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", "must be -1 or 0 (off) or an integer >= 1", self.top_k)
        if self.seed is not None and not (_is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED):
            _fail("seed", f"must be null or an integer in [{MIN_SEED}, {MAX_SEED}]", self.seed)

        # OpenAI accepts `stop` as one string or a list; keep a tuple so the params stay hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            _fail("stop", "must be a string or a list of non-empty strings", self.stop)
        object.__setattr__(self, "stop", tuple(stop))

        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)) or not all(_is_int(i) and i >= 0 for i in ids):
            _fail("stop_token_ids", "must be a list of non-negative integers", ids)
        object.__setattr__(self, "stop_token_ids", tuple(ids))

        for name in ("ignore_eos", "logprobs", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "must be a boolean", getattr(self, name))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def _set_float(self, name: str, ok: Callable[[float], bool], rule: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(name, rule, value)
        value = float(value)
        if not math.isfinite(value) or not ok(value):
            _fail(name, rule, value)
        object.__setattr__(self, name, value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(name: str, rule: str, value: object) -> None:
    raise SamplingParamsError(name, f"{name} {rule}, got {value!r}")
