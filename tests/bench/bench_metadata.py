"""Host time of a decode step's attention metadata: block tables patched across steps
(IncrementalTables, what the model runner does) vs built from scratch every step (StepTables.build,
the reference), at 64 and 256 decoding sequences.

Run: `python -m tests.bench.bench_metadata`. Prints median microseconds per step and the ratio
incremental / rebuild, for the tables alone and for the whole host metadata (tables, then positions,
slots and the one packed buffer: `AttentionMetadata.from_tables` on the CPU). Two workloads: steady
decoding (the same sequences every step) and churn (every other step a sequence finishes and a new
one joins). Both paths get the same precomputed steps, interleaved, so machine noise hits both
alike. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from tests.bench.bench_util import print_table
from workers.model.attention_metadata import AttentionMetadata, SeqExtent, StepTables
from workers.model.incremental_tables import IncrementalTables

BLOCK_SIZE = 16


def decode_steps(num_seqs: int, num_steps: int, churn: bool, seed: int = 0):
    """(seq_ids, extents) of consecutive decode steps; contexts of 200–2000 tokens."""
    rng = random.Random(seed)
    next_block = 0
    next_id = 0

    def new_seq() -> list:
        nonlocal next_block, next_id
        ctx = rng.randint(200, 2000)
        table = list(range(next_block, next_block + (ctx + num_steps) // BLOCK_SIZE + 1))
        next_block += len(table)
        next_id += 1
        return [next_id - 1, ctx, table]

    seqs = [new_seq() for _ in range(num_seqs)]
    steps = []
    for t in range(num_steps):
        if churn and t % 2:
            seqs.pop(rng.randrange(len(seqs)))
            seqs.append(new_seq())
        extents = [SeqExtent(ctx - 1, 1, tuple(table[:-(-ctx // BLOCK_SIZE)])) for _, ctx, table in seqs]
        steps.append(([s[0] for s in seqs], extents))
        for s in seqs:
            s[1] += 1
    return steps


def measure(num_seqs: int, num_steps: int, churn: bool) -> dict[str, float]:
    steps = decode_steps(num_seqs, num_steps, churn)
    tables = IncrementalTables(BLOCK_SIZE)
    times: dict[str, list[float]] = {k: [] for k in ("rebuild tables", "incremental tables",
                                                     "rebuild metadata", "incremental metadata")}
    warm = 5
    for i, (ids, extents) in enumerate(steps):
        t0 = time.perf_counter()
        ref = StepTables.build(extents, BLOCK_SIZE)
        t1 = time.perf_counter()
        AttentionMetadata.from_tables(extents, ref, BLOCK_SIZE)
        t2 = time.perf_counter()
        inc = tables.update(ids, extents)
        t3 = time.perf_counter()
        AttentionMetadata.from_tables(extents, inc, BLOCK_SIZE)
        t4 = time.perf_counter()
        if i >= warm:
            times["rebuild tables"].append(t1 - t0)
            times["rebuild metadata"].append(t2 - t0)
            times["incremental tables"].append(t3 - t2)
            times["incremental metadata"].append(t4 - t2)
    if not torch.equal(inc.tables_MB, ref.tables_MB):
        raise AssertionError("the incremental tables differ from the fresh build")
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for churn in (False, True):
        for num_seqs in (64, 256):
            m = measure(num_seqs, args.steps, churn)
            rows.append([
                "churn" if churn else "steady", num_seqs,
                f"{m['rebuild tables']:.0f}", f"{m['incremental tables']:.0f}",
                f"{m['incremental tables'] / m['rebuild tables']:.2f}",
                f"{m['rebuild metadata']:.0f}", f"{m['incremental metadata']:.0f}",
                f"{m['incremental metadata'] / m['rebuild metadata']:.2f}",
            ])
    print(f"decode step host metadata, block size {BLOCK_SIZE}, contexts 200–2000 tokens, "
          f"median of {args.steps - 5} steps (µs)")
    print_table(["workload", "seqs", "tables rebuild", "tables incr", "ratio",
                 "metadata rebuild", "metadata incr", "ratio"], rows)


if __name__ == "__main__":
    main()
