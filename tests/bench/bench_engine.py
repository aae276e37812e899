"""Engine throughput: our continuous batching vs HF generate, on the demo and a small model.

Run from the repository root: `python -m tests.bench.bench_engine` (add `--quick` for a smoke
run, `--plot out.png` for a bar chart). Not a test: nothing here asserts a time.

Every request has the same shape: a random prompt of `prompt_len` tokens, then exactly
`output_len` greedy tokens (ignore_eos for us, min_new_tokens for HF), so every system does
the same work. Systems, all fp32 on `--threads` CPU threads, weights from one checkpoint:

    ours c=N       our engine; the requests launched at once, at most N in flight (a semaphore)
    HF one-by-one  MixtralForCausalLM.generate, one request after another
    HF padded      MixtralForCausalLM.generate on one left-padded batch of all requests

Throughput is output tokens / wall time of the whole set (prefill included). Each repetition
runs every system once, in an order rotated per repetition, so drift and noise hit all
alike; the table shows medians over repetitions. Sequential systems (ours c=1, HF
one-by-one) run fewer requests to keep the run short; tokens/s does not depend on how many.

Models: "demo" is the built-in demo checkpoint; "small" is a transformers MixtralConfig
(hidden 1024, intermediate 3584, 8 experts top-2, 16/8 heads, 2 layers, vocab 32000) with
transformers' own initialisation, written with `save_pretrained`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from cluster.engine import Engine
from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from gateway.demo_checkpoint import write_demo_checkpoint
from tests.bench.bench_util import Samples, print_table, verdict
from workers.model.sampling_params import SamplingParams

CONCURRENCIES = (1, 4, 16)
HF_SEQUENTIAL, HF_PADDED = "HF one-by-one", "HF padded"
PAD_ID = 0
# (name, numerator, denominator, target): the acceptance ratios, all lower bounds.
TARGETS = (
    ("ours c=16 / HF one-by-one", "ours c=16", HF_SEQUENTIAL, 4.0),
    ("ours c=16 / HF padded", "ours c=16", HF_PADDED, 1.0),
    ("ours c=16 / ours c=1", "ours c=16", "ours c=1", 5.0),
)
SMALL_MIXTRAL = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=2,
    num_attention_heads=16, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5,
)


@dataclass(frozen=True)
class Workload:
    prompt_len: int
    output_len: int
    num_requests: int  # for the batched systems (ours c>1, HF padded)
    num_sequential: int  # for the one-at-a-time systems (ours c=1, HF one-by-one)
    repeats: int


@dataclass(frozen=True)
class Run:
    seconds: float
    outputs: list[list[int]]  # generated ids of each request, in prompt order

    @property
    def tokens_per_s(self) -> float:
        return sum(len(o) for o in self.outputs) / self.seconds


# -- checkpoints --------------------------------------------------------------------------


def write_small_checkpoint(out_dir: Path, seed: int = 0) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MixtralForCausalLM(MixtralConfig(**SMALL_MIXTRAL))
    model.save_pretrained(out_dir)
    return out_dir


CHECKPOINTS: dict[str, Callable[[Path], Path]] = {
    "demo": lambda d: write_demo_checkpoint(d, progress=False),
    "small": write_small_checkpoint,
}


def random_prompts(vocab_size: int, num: int, length: int, seed: int = 0) -> list[list[int]]:
    """Ids above the special tokens (<unk>, <s>, </s> = 0, 1, 2), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (num, length), generator=gen).tolist()


# -- systems ------------------------------------------------------------------------------


async def run_ours(engine: Engine, prompts: list[list[int]], output_len: int, concurrency: int,
                   tag: str) -> Run:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    in_flight = asyncio.Semaphore(concurrency)

    async def one(i: int, prompt: list[int]) -> list[int]:
        async with in_flight:
            ids: list[int] = []
            async for out in engine.generate(f"{tag}-{i}", prompt, params):
                ids += out.token_ids
            return ids

    t0 = time.perf_counter()
    outputs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return Run(time.perf_counter() - t0, list(outputs))


def hf_generate(model, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """One generate call over a left-padded batch (the attention mask hides the padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
                         min_new_tokens=output_len, pad_token_id=PAD_ID)
    return out[:, width:].tolist()


def run_hf_sequential(model, prompts: list[list[int]], output_len: int) -> Run:
    t0 = time.perf_counter()
    outputs = [hf_generate(model, [p], output_len)[0] for p in prompts]
    return Run(time.perf_counter() - t0, outputs)


def run_hf_padded(model, prompts: list[list[int]], output_len: int) -> Run:
    t0 = time.perf_counter()
    outputs = hf_generate(model, prompts, output_len)
    return Run(time.perf_counter() - t0, outputs)


def systems(engine: Engine, hf_model, prompts: list[list[int]],
            wl: Workload) -> dict[str, Callable[[str], Awaitable[Run]]]:
    """Each system as `await run(tag)`; tags keep request ids unique across repetitions."""
    sequential, batch = prompts[: wl.num_sequential], prompts[: wl.num_requests]

    def ours(c: int) -> Callable[[str], Awaitable[Run]]:
        return lambda tag: run_ours(engine, sequential if c == 1 else batch, wl.output_len, c, tag)

    async def hf_sequential(tag: str) -> Run:
        return run_hf_sequential(hf_model, sequential, wl.output_len)

    async def hf_padded(tag: str) -> Run:
        return run_hf_padded(hf_model, batch, wl.output_len)

    return {**{f"ours c={c}": ours(c) for c in CONCURRENCIES}, HF_SEQUENTIAL: hf_sequential,
            HF_PADDED: hf_padded}


# -- measurement --------------------------------------------------------------------------


@dataclass
class ModelResult:
    name: str
    samples: dict[str, Samples]
    num_requests: dict[str, int]
    num_agree: int  # requests whose greedy output equals HF padded's

    def tokens_per_s(self, system: str) -> float:
        return self.samples[system].median


async def bench_model(name: str, model_dir: Path, wl: Workload) -> ModelResult:
    from transformers import MixtralForCausalLM

    hf_model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = build_local_engine(model_dir, EngineConfig(), torch.float32)
    prompts = random_prompts(hf_model.config.vocab_size, wl.num_requests, wl.prompt_len)
    runs = systems(engine, hf_model, prompts, wl)
    warm_ups = systems(engine, hf_model, prompts, replace(wl, output_len=2))
    samples = {s: Samples() for s in runs}
    last: dict[str, Run] = {}
    try:
        with torch.inference_mode():
            for system, warm_up in warm_ups.items():  # first calls allocate and build caches
                await warm_up(f"{name}-warm-{system}")
            order = list(runs)
            bar = tqdm(total=wl.repeats * len(order), desc=f"{name} model", unit="run")
            for rep in range(wl.repeats):
                shift = rep % len(order)
                for system in order[shift:] + order[:shift]:
                    bar.set_postfix_str(system)
                    last[system] = await runs[system](f"{name}-{rep}-{system}")
                    samples[system].add(last[system].tokens_per_s)
                    bar.update()
            bar.close()
    finally:
        await engine.shutdown()
    reference = last[HF_PADDED].outputs
    num_agree = sum(a == b for a, b in zip(last["ours c=16"].outputs, reference, strict=True))
    num_requests = {s: len(r.outputs) for s, r in last.items()}
    del hf_model, engine
    gc.collect()
    return ModelResult(name, samples, num_requests, num_agree)


# -- report -------------------------------------------------------------------------------


def report(results: list[ModelResult], wl: Workload) -> None:
    rows = []
    for r in results:
        seq, pad = r.tokens_per_s(HF_SEQUENTIAL), r.tokens_per_s(HF_PADDED)
        for system, s in r.samples.items():
            rows.append((r.name, system, r.num_requests[system], f"{s.median:.1f}", s.spread,
                         f"{s.median / seq:.2f}", f"{s.median / pad:.2f}"))
    print()
    print_table(("model", "system", "requests", "tokens/s", "min–max", "vs HF 1-by-1", "vs HF padded"), rows)
    print()
    for r in results:
        print(f"{r.name}: greedy outputs of ours c=16 equal HF padded's for "
              f"{r.num_agree}/{wl.num_requests} requests (a sanity check that both did the same work)")
    print()
    rows = []
    for r in results:
        for label, num, den, target in TARGETS:
            ratio = r.tokens_per_s(num) / r.tokens_per_s(den)
            rows.append((r.name, label, f"{ratio:.2f}", f">= {target:.1f}", verdict(ratio, target)))
    print_table(("model", "target", "ratio", "goal", "verdict"), rows)


def plot(results: list[ModelResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        names = list(r.samples)
        ax.bar(names, [r.tokens_per_s(n) for n in names],
               color=["tab:blue" if n.startswith("ours") else "tab:gray" for n in names])
        ax.set_title(f"{r.name} model")
        ax.set_ylabel("output tokens/s")
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(CHECKPOINTS), default=list(CHECKPOINTS))
    ap.add_argument("--quick", action="store_true", help="smoke run: 16+16 tokens, one repetition")
    ap.add_argument("--prompt-len", type=int, help="default 64 (16 with --quick)")
    ap.add_argument("--output-len", type=int, help="default 64 (16 with --quick)")
    ap.add_argument("--repeats", type=int, help="default 3 (1 with --quick)")
    ap.add_argument("--sequential-requests", type=int, default=4,
                    help="requests timed for ours c=1 and HF one-by-one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", metavar="PNG", help="also write a bar chart (needs matplotlib)")
    args = ap.parse_args()
    quick = args.quick
    wl = Workload(
        prompt_len=args.prompt_len or (16 if quick else 64),
        output_len=args.output_len or (16 if quick else 64),
        num_requests=max(CONCURRENCIES),
        num_sequential=args.sequential_requests,
        repeats=args.repeats or (1 if quick else 3),
    )
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"engine throughput: {wl.prompt_len} prompt + {wl.output_len} output tokens per request (greedy, "
          f"no early stop), {wl.num_requests} requests for batched systems, {wl.num_sequential} for "
          f"sequential ones, {wl.repeats} repetition(s), fp32, {args.threads} threads, {EngineConfig()}")
    # This box may be shared: a busy neighbour stalls the second thread, so say how busy it was.
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        for name in args.models:
            model_dir = CHECKPOINTS[name](Path(tmp) / name)
            results.append(asyncio.run(bench_model(name, model_dir, wl)))
    report(results, wl)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s; load average at end: "
          f"{os.getloadavg()[0]:.2f}")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
