"""bench_distributed's report: the systems it compares, one result per step shape, and the tables.

Split from tests/bench/bench_distributed.py (which measures); see its docstring for what the
columns mean.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from tests.bench.bench_util import Samples, print_table

TARGET_RATIO = 1.5  # distributed / single-process step time at TARGET_TOKENS, an upper bound
TARGET_TOKENS = 64


def p90(s: Samples) -> float:
    return statistics.quantiles(s.values, n=10)[-1]


LOCAL = ("local", "local (cgraph alive)")
LOW_LATENCY = "ray low-latency"
CHANNEL_LOW_LATENCY = "channel low-latency"
DISTRIBUTED = ("ray", LOW_LATENCY, "channel", CHANNEL_LOW_LATENCY, "cgraph")
# Issue 15's goals for the low-latency path, distributed / single-process step time by tokens.
LOW_LATENCY_TARGETS = {1: 1.2, 64: 1.05}
# Per distributed step: rank 0's time inside execute and its dispatch + combine, the busiest
# expert worker's grouped experts, and two differences taken within the same step:
# call = step − rank 0's execute, a2a = rank 0's dispatch + combine − the busiest experts.
WORKER_FIELDS = ("rank0_busy", "rank0_moe", "experts", "call", "a2a")


@dataclass
class Result:
    kind: str
    num_tokens: int
    times: dict[str, Samples] = field(default_factory=dict)  # system → step seconds
    stats: dict[str, dict[str, Samples]] = field(default_factory=dict)  # system → "local_moe"/WORKER_FIELDS

    def stat(self, system: str, name: str) -> float | None:
        s = self.stats[system][name]
        return s.median if s.values else None


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def report(results: list[Result], bare: dict[str, Samples], num_layers: int) -> None:
    rows = []
    for r in results:
        base = r.times["local"].median
        for system in ("local", "ray", LOW_LATENCY, "channel", CHANNEL_LOW_LATENCY, "local (cgraph alive)",
                       "cgraph"):
            if system not in r.times:
                continue
            s = r.times[system]
            extra = s.median - base
            added = ("", "") if system == "local" else (ms(extra), ms(extra / num_layers))
            rows.append((r.kind, r.num_tokens, system, ms(s.median), ms(p90(s)), f"{s.median / base:.2f}",
                         *added))
    print()
    print_table(("kind", "tokens", "system", "median ms", "p90 ms", "× local", "+ms/step",
                 f"+ms/MoE layer (L={num_layers})"), rows)
    print("\nbare Ray round trip (one no-op actor call, no arguments, before any compiled graph): "
          + "; ".join(f"{where} median {ms(s.median)} ms, p90 {ms(p90(s))} ms" for where, s in bare.items()))

    paths = [(r, p) for r in results for p in DISTRIBUTED if p in r.times]
    print("\nper MoE layer (medians, ms):")
    rows = []
    for r, path in paths:
        moe, experts, a2a = (r.stat(path, f) / num_layers for f in ("rank0_moe", "experts", "a2a"))
        rows.append((r.kind, r.num_tokens, path, ms(r.stat("local", "local_moe") / num_layers), ms(moe),
                     ms(experts), ms(a2a)))
    print_table(("kind", "tokens", "path", "local MoE", "rank0 dispatch+combine", "remote experts",
                 "a2a+wait"), rows)
    print("  local MoE: dispatch + experts + combine in the single process; rank0 dispatch+combine: the\n"
          "  attention worker's, which wait for the remote experts; remote experts: the busiest expert\n"
          "  worker's grouped experts; a2a+wait: rank0 dispatch+combine − remote experts, step by step\n"
          "  (three gloo all-to-alls per layer: counts, rows out, rows back, and the wake-ups around them).")

    print(f"\nper step (medians, ms): measured + ≈ control + L × a2a+wait + L × Δexperts + Δnon-MoE "
          f"(L={num_layers})")
    rows = []
    for r, path in paths:
        local, local_moe = r.times["local"].median, r.stat("local", "local_moe")
        w = {f: r.stat(path, f) for f in WORKER_FIELDS}
        busy = w["rank0_busy"]
        parts = {"call": w["call"], "a2a": w["a2a"], "experts": w["experts"] - local_moe,
                 "rest": None if busy is None else (busy - w["rank0_moe"]) - (local - local_moe)}
        known = [v for v in parts.values() if v is not None]
        measured = r.times[path].median - local
        share = f"{w['call'] / measured:.0%}" if w["call"] is not None and measured > 0 else "n/a"
        noop = r.times.get(f"{path} no-op")
        rows.append((r.kind, r.num_tokens, path, ms(noop.median) if noop else "n/a",
                     *("n/a" if v is None else ms(v) for v in parts.values()), ms(sum(known)), ms(measured),
                     share))
    print_table(("kind", "tokens", "path", "no-op fan-out", "control", "L×a2a+wait", "L×Δexperts",
                 "Δnon-MoE", "sum", "measured +", "control share"), rows)
    print("  no-op fan-out: the same three-actor step to no-ops (batch to the first); control: step − the\n"
          "  attention worker's time inside execute (the Ray call, or the channel's send, read and reply);\n"
          "  Δexperts: remote experts − local MoE; Δnon-MoE: the attention worker's non-MoE time\n"
          "  (attention, router, LM head, sampling) − the single process's; control share: control /\n"
          "  measured +.\n"
          "  Medians of parts need not add up to the median of the whole.")

    print(f"\ntarget: distributed / single-process step time <= {TARGET_RATIO} "
          f"at {TARGET_TOKENS} tokens per step")
    rows = []
    for r in results:
        if r.num_tokens != TARGET_TOKENS:
            continue
        for system in DISTRIBUTED:
            if system in r.times:
                ratio = r.times[system].median / r.times["local"].median
                rows.append((r.kind, system, f"{ratio:.2f}", f"<= {TARGET_RATIO}",
                             "PASS" if ratio <= TARGET_RATIO else "MISS"))
    if rows:
        print_table(("kind", "path", "ratio", "goal", "verdict"), rows)
    else:
        print(f"  (not measured: add {TARGET_TOKENS} to --tokens)")

    print("\nlow-latency vs exact dispatch, decode steps (distributed / single-process step time):")
    rows = []
    for r in results:
        if r.kind != "decode" or LOW_LATENCY not in r.times:
            continue
        local = r.times["local"].median
        for control, exact_system, low_system in (("ray", "ray", LOW_LATENCY),
                                                  ("channel", "channel", CHANNEL_LOW_LATENCY)):
            exact, low = r.times[exact_system].median / local, r.times[low_system].median / local
            goal = LOW_LATENCY_TARGETS.get(r.num_tokens)
            verdict = "" if goal is None else ("PASS" if low <= goal else "MISS")
            rows.append((r.num_tokens, control, f"{exact:.2f}", f"{low:.2f}", f"{exact / low:.2f}",
                         "" if goal is None else f"<= {goal}", verdict))
    print_table(("tokens", "control", "exact ×local", "low-latency ×local", "exact / low-latency", "goal",
                 "verdict"), rows)

    print("\nchannel vs Ray call, the same workers in the same phase (step time; ratios of medians):")
    rows = []
    for r in results:
        local = r.times["local"].median
        for dispatch, ray_system, channel_system in (("exact", "ray", "channel"),
                                                     ("low-latency", LOW_LATENCY, CHANNEL_LOW_LATENCY)):
            if r.kind != "decode" and dispatch == "low-latency":
                continue  # prefill steps always dispatch exact: the same numbers again
            ray_s, channel_s = r.times[ray_system].median, r.times[channel_system].median
            rows.append((r.kind, r.num_tokens, dispatch, ms(ray_s), ms(channel_s), ms(ray_s - channel_s),
                         f"{ray_s / local:.2f}", f"{channel_s / local:.2f}", f"{ray_s / channel_s:.2f}"))
    print_table(("kind", "tokens", "dispatch", "ray ms", "channel ms", "saved ms", "ray ×local",
                 "channel ×local", "ray / channel"), rows)


