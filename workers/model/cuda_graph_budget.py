"""How much start-up time and device memory capturing decode graphs may take.

Capture runs bucket by bucket, largest first; before each one the budget is asked whether the
time or memory spent so far leaves room. A spent budget skips the remaining (smaller)
buckets, which costs padding (a small step pads up to the smallest bucket captured), never
correctness. A pure decision on two numbers the capture loop measures.
"""

from __future__ import annotations

from dataclasses import dataclass

_GIB = 1 << 30


@dataclass(frozen=True)
class CaptureBudget:
    max_seconds: float = 120.0  # wall time of warm-ups and captures together
    max_bytes: int = 4 * _GIB  # device memory the captures hold (graph pool, workspaces)

    def __post_init__(self) -> None:
        if self.max_seconds <= 0 or self.max_bytes <= 0:
            raise ValueError(f"a capture budget must be positive, got {self.max_seconds} s and "
                             f"{self.max_bytes} bytes")

    def spent(self, elapsed_s: float, used_bytes: int) -> str | None:
        """Why no further bucket may be captured, or None while both limits hold."""
        if elapsed_s >= self.max_seconds:
            return f"capture time budget spent ({elapsed_s:.1f} s of {self.max_seconds:g} s)"
        if used_bytes >= self.max_bytes:
            return (f"capture memory budget spent ({used_bytes / _GIB:.2f} GiB of "
                    f"{self.max_bytes / _GIB:.2f} GiB)")
        return None
