"""bench_elastic's report: each figure beside the reference measured in the same run, their
ratio, and issue 16's target where it names one (met / not met). Nothing here measures."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from cluster.plane_event import PlaneEvent
from cluster.rebalance_policy import Proposal
from tests.bench.bench_util import print_table
from tests.bench.elastic_load import SteadyLoad
from tests.bench.elastic_phases import Change, Interval, Recovered

STEP_TARGET = 1.5  # longest step during a rebalance / p99 step before it: at most
REPAIR_TARGET_S = 2.0  # one expert worker's recovery: at most, here
REPAIR_SPEEDUP_TARGET = 3.0  # whole-group restart / one-worker repair: at least


@dataclass(frozen=True)
class Row:
    figure: str
    value: str
    reference: str  # what it is compared with, measured in the same run
    ratio: str
    target: str = "—"
    verdict: str = "—"


def ratio(value: float | None, reference: float | None) -> float:
    if value is None or reference is None or not reference > 0:
        return math.nan
    return value / reference


def fmt_ratio(r: float) -> str:
    return "n/a" if math.isnan(r) else f"{r:.2f}×"


def at_most(value: float, bound: float) -> str:
    return "n/a" if math.isnan(value) else ("met" if value <= bound else "not met")


def at_least(value: float, bound: float) -> str:
    return "n/a" if math.isnan(value) else ("met" if value >= bound else "not met")


def s(seconds: float | None) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds:.3f} s"


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.0f} ms"


def step_row(what: str, longest: float, p99_before: float, target: bool = False) -> Row:
    r = ratio(longest, p99_before)
    return Row(f"longest step during {what}", ms(longest), f"p99 step before {ms(p99_before)}", fmt_ratio(r),
               f"≤ {STEP_TARGET}×" if target else "—", at_most(r, STEP_TARGET) if target else "—")


def recovery_rows(what: str, repair_s: float, restart_s: float) -> list[Row]:
    """`what` of a one-worker repair against a whole-group restart: the issue's two targets."""
    speedup = ratio(restart_s, repair_s)
    return [
        Row(f"{what}, repair", s(repair_s), f"group restart {s(restart_s)}",
            fmt_ratio(ratio(repair_s, restart_s)), f"≤ {REPAIR_TARGET_S:g} s",
            at_most(repair_s, REPAIR_TARGET_S)),
        Row(f"{what}, speed-up", fmt_ratio(speedup), "restart / repair", fmt_ratio(speedup),
            f"≥ {REPAIR_SPEEDUP_TARGET:g}×", at_least(speedup, REPAIR_SPEEDUP_TARGET)),
    ]


def print_rows(rows: list[Row]) -> None:
    print_table(("figure", "value", "reference (same run)", "ratio", "issue target", "verdict"),
                [(r.figure, r.value, r.reference, r.ratio, r.target, r.verdict) for r in rows])


@dataclass(frozen=True)
class Results:
    before: Interval
    proposal: Proposal
    rebalances: tuple[Change, ...]  # to the proposal, back, to it again, ... (bench_elastic.NUM_REBALANCES)
    after: Interval
    up: Change
    down: Change
    repair: Recovered  # one expert worker repaired alone
    grow_back: PlaneEvent | None  # the scale-up that replaced it, in the background
    restart: Recovered  # the same kill with every fault restarting the whole group
    load: SteadyLoad


def change_rows(name: str, c: Change) -> list[Row]:
    e = c.event
    outcome = "" if e.outcome == "done" else f" ({e.outcome}: {e.detail})"
    return [
        Row(f"{name} pause{outcome}", ms(e.pause_seconds), f"p99 step before {ms(c.p99_before)}",
            fmt_ratio(ratio(e.pause_seconds, c.p99_before))),
        Row(f"{name} whole", s(e.seconds), "—", "—"),
        step_row(name, c.longest_step, c.p99_before),
    ]


def report(r: Results, setup: str) -> None:
    b, a, p = r.before, r.after, r.proposal
    print(f"\n{setup}; steps measured: {b.num_steps} before, {a.num_steps} after the rebalance")
    for c in r.rebalances:
        if c.event.outcome != "done":
            print(f"a rebalance was {c.event.outcome}: {c.event.detail}")
    longest = [c.longest_step for c in r.rebalances]
    rows = [
        Row("imbalance (plane window)", f"{a.imbalance:.2f}", f"before {b.imbalance:.2f}",
            fmt_ratio(ratio(a.imbalance, b.imbalance))),
        Row("imbalance (workers' counters)", f"{a.measured_imbalance:.2f}",
            f"before {b.measured_imbalance:.2f}",
            fmt_ratio(ratio(a.measured_imbalance, b.measured_imbalance))),
        Row("imbalance the proposal predicted", f"{p.imbalance_after:.2f}",
            f"before {p.imbalance_before:.2f}",
            fmt_ratio(ratio(p.imbalance_after, p.imbalance_before))),
        Row("output tokens/s", f"{a.tokens_per_s:.1f}", f"before {b.tokens_per_s:.1f}",
            fmt_ratio(ratio(a.tokens_per_s, b.tokens_per_s))),
        Row("rebalance whole, median (steps never wait)",
            s(statistics.median(c.event.seconds for c in r.rebalances)), "—", "—"),
        step_row(f"a rebalance, median of {len(longest)}", statistics.median(longest), b.p99_step,
                 target=True),
        step_row(f"a rebalance, worst of {len(longest)}", max(longest), b.p99_step, target=True),
        *change_rows(f"scale-up {r.up.event.num_expert_workers - 1}→{r.up.event.num_expert_workers}", r.up),
        *change_rows(f"scale-down {r.down.event.num_expert_workers + 1}→{r.down.event.num_expert_workers}",
                     r.down),
    ]
    for rec in (r.repair, r.restart):
        if rec.event is not None and rec.event.outcome != "recovered":
            print(f"a recovery was {rec.event.outcome}: {rec.event.error}")
    if r.repair.event is None or r.restart.event is None:
        print("a kill was not recovered within the time-out: no recovery figures")
    else:
        rows += [
            *recovery_rows("recovery (RecoveryEvent)", r.repair.event.seconds, r.restart.event.seconds),
            *recovery_rows("kill → every stream's next token", r.repair.stall_max, r.restart.stall_max),
            Row("kill → next token, median stream", s(r.repair.stall_median),
                f"group restart {s(r.restart.stall_median)}", fmt_ratio(ratio(r.repair.stall_median,
                                                                              r.restart.stall_median))),
            Row(f"sequences prefilled again ({r.repair.event.repair})", str(r.repair.event.num_requeued),
                f"{r.restart.event.repair} {r.restart.event.num_requeued}", "—"),
        ]
    if r.grow_back is not None:
        g = r.grow_back
        rows.append(Row(f"grow-back after the repair ({g.outcome}) pause", ms(g.pause_seconds),
                        f"whole {s(g.seconds)}", "—"))
    errors, mismatches = len(r.load.errors), r.load.num_mismatches
    rows += [
        Row("requests failed", str(errors), f"of {r.load.num_finished + errors}", "—", "0",
            "met" if errors == 0 else "not met"),
        Row("greedy outputs that changed", str(mismatches), "first run of each prompt", "—", "0",
            "met" if mismatches == 0 else "not met"),
    ]
    print()
    print_rows(rows)
    print(f"\nsteps before the rebalance: p50 {ms(b.p50_step)}, p99 {ms(b.p99_step)} (event loop held at "
          f"most {ms(b.loop_lag)}); after: p50 {ms(a.p50_step)}, p99 {ms(a.p99_step)}")
    changes = [(f"rebalance {i + 1}", c) for i, c in enumerate(r.rebalances)]
    for name, c in [*changes, ("scale-up", r.up), ("scale-down", r.down)]:
        print(f"steps (ms) during the {name}: {' '.join(f'{d * 1e3:.0f}' for d in c.during) or 'none'}; "
              f"the next: {' '.join(f'{d * 1e3:.0f}' for d in c.next)}; event loop held at most "
              f"{ms(c.loop_lag)}")
    for error in r.load.errors[:5]:
        print(f"  failed: {error}")
