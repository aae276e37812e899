"""Stop conditions of one sequence, and the text it may stream so far.

Called once per generated token with the token id and the text delta the incremental
detokenizer produced for it. A stop string can span token boundaries ("Hel" + "lo wo"
+ "rld" contains "lo w"), so text that could be the start of a stop string is held back
until it either completes one (and is cut) or can no longer match (and is released).
The emitted deltas, joined, are always the generated text cut at the first stop string,
however the text was split into tokens.

Which stop string wins when several appear: the one that completes first (the earliest
end; on a tie the longer one, i.e. the earlier start). That is what a reader going
character by character would see, so the answer does not depend on how the text was
split into deltas.

Pure Python: no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from workers.model.sampling_params import SamplingParams

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StopDecision:
    finished: bool
    reason: FinishReason | None  # None while the sequence goes on
    text: str  # the delta to emit now (may be "" while a possible stop string is held back)


class StopChecker:
    def __init__(
        self, params: SamplingParams, eos_token_ids: tuple[int, ...], max_model_len: int
    ) -> None:
        self.params = params
        self.max_model_len = max_model_len
        self._stop_strings = tuple(s for s in params.stop if s)
        self._stop_token_ids = frozenset(params.stop_token_ids)
        self._eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self._include_stop = params.include_stop_str_in_output
        # A match can span at most max_len - 1 characters of earlier text.
        self._window_len = max((len(s) for s in self._stop_strings), default=1) - 1
        self._window = ""  # recent text: released context, then the held-back tail
        self._num_held = 0  # characters at the end of _window not emitted yet
        self.finished = False

    def check(
        self, token_id: int, text_delta: str, num_output_tokens: int, num_total_tokens: int
    ) -> StopDecision:
        """Decide after one new token. Counts include the new token."""
        if self.finished:
            raise RuntimeError("StopChecker.check() called after the sequence finished")
        stop_token = token_id in self._eos_token_ids or token_id in self._stop_token_ids
        if stop_token and not self._include_stop:
            text_delta = ""  # the stop token's own text is not shown (as in vLLM)

        text = self._window + text_delta
        released = len(self._window) - self._num_held  # text[:released] is already out
        match = self._first_stop_string(text)
        if match is not None:
            start, end = match
            return self._finish("stop", text[released : end if self._include_stop else start])
        if stop_token:
            return self._finish("stop", text[released:])
        if self._hit_length(num_output_tokens, num_total_tokens):
            return self._finish("length", text[released:])

        keep = len(text) - self._num_to_hold(text)
        self._window = text[max(0, len(text) - self._window_len) :]
        self._num_held = len(text) - keep
        return StopDecision(finished=False, reason=None, text=text[released:keep])

    def flush(self) -> str:
        """Release held-back text when the sequence ends for a reason decided elsewhere."""
        held = self._window[len(self._window) - self._num_held :]
        self._num_held = 0
        self.finished = True
        return held

    def _finish(self, reason: FinishReason, text: str) -> StopDecision:
        self.finished = True
        self._window, self._num_held = "", 0
        return StopDecision(finished=True, reason=reason, text=text)

    def _hit_length(self, num_output_tokens: int, num_total_tokens: int) -> bool:
        return (
            num_output_tokens >= self.params.max_tokens
            or num_total_tokens >= self.max_model_len
        )

    def _first_stop_string(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the stop string that completes first in `text`, if any."""
        best: tuple[int, int] | None = None
        for stop in self._stop_strings:
            start = text.find(stop)
            if start < 0:
                continue
            end = start + len(stop)
            if best is None or (end, start) < (best[1], best[0]):
                best = (start, end)
        return best

    def _num_to_hold(self, text: str) -> int:
        """Length of the longest suffix of `text` that could still grow into a stop string.

        With include_stop_str_in_output nothing needs holding: the stop string is emitted
        anyway, and everything before it too.
        """
        if self._include_stop:
            return 0
        for n in range(min(len(text), self._window_len), 0, -1):
            tail = text[len(text) - n :]
            if any(stop.startswith(tail) for stop in self._stop_strings):
                return n
        return 0
