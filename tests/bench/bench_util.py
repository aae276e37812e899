"""Helpers the benchmark scripts share: repeated samples, aligned tables, target verdicts."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Samples:
    """Repeated measurements of one quantity (e.g. tokens/s of one system)."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> str:
        """min–max, so a reader sees how noisy the median is."""
        return f"{min(self.values):.1f}–{max(self.values):.1f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Left-align the first column, right-align the rest."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        first, *rest = zip(row, widths, strict=True)
        return "  ".join([first[0].ljust(first[1])] + [c.rjust(w) for c, w in rest])

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def verdict(value: float, target: float) -> str:
    """PASS when value reaches a lower-bound target."""
    return "PASS" if value >= target else "MISS"
