"""Will these bundles fit the cluster? Pure arithmetic over Ray resource dicts.

A placement group that cannot be placed waits forever in Ray, and Serve waits on it without
a word; so before asking, the demand is compared with what the cluster has, and a shortfall
is named ("GPU: needs 3, the cluster has 0 available") instead of hanging. Totals are a
necessary condition, not a sufficient one (STRICT_PACK needs them on one node), which is
why `reserve` still has its timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Resources = Mapping[str, float]


def total_demand(bundles: Iterable[Resources]) -> dict[str, float]:
    out: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            out[name] = out.get(name, 0.0) + amount
    return out


def missing_resources(bundles: Iterable[Resources], available: Resources) -> dict[str, tuple[float, float]]:
    """name → (needed, available) for every resource the bundles need more of than there is."""
    demand = total_demand(bundles)
    return {name: (need, float(available.get(name, 0.0)))
            for name, need in sorted(demand.items()) if need > available.get(name, 0.0) + 1e-9}


def describe_missing(bundles: Iterable[Resources], available: Resources) -> str:
    """'' when nothing is short; else one line naming each shortfall."""
    short = missing_resources(bundles, available)
    return "; ".join(f"{name}: needs {need:g}, the cluster has {have:g} available"
                     for name, (need, have) in short.items())
