"""MoE layer speed: ours vs a dense SwiGLU of equal active FLOPs vs HF's MixtralSparseMoeBlock.

Run: `make bench` (or `python tests/bench/bench_moe_layer.py`). Prints median times and the
ratios ours/dense and HF/ours; timings are interleaved (ours, dense, HF, ours, ...) in one
process so machine noise hits all three alike. Not a test: nothing here asserts a time.

Dense-equivalent: one SwiGLU of width top_k × intermediate_size, which does exactly the
matmul FLOPs of the routed experts of a top-k MoE layer without any routing work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from workers.dispatcher import LocalDispatcher
from workers.experts import LayerExperts, swiglu
from workers.moe import moe_block


def build(hidden: int, inter: int, num_experts: int, top_k: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                        num_experts_per_tok=top_k)
    hf = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)

    class _FromHF:
        def __init__(self, e: int) -> None:
            gate_up, down = hf.experts.gate_up_proj[e].detach(), hf.experts.down_proj[e].detach()
            self.w1, self.w3, self.w2 = gate_up[:inter], gate_up[inter:], down

    experts = LayerExperts.stack({e: _FromHF(e) for e in range(num_experts)})
    dispatcher = LocalDispatcher({0: experts})
    gate = hf.gate.weight.detach()
    dense_w13 = torch.randn(2 * top_k * inter, hidden) * 0.02
    dense_w2 = torch.randn(hidden, top_k * inter) * 0.02

    def ours(x):
        return moe_block(0, x, gate, top_k, dispatcher)

    def dense(x):
        return swiglu(x, dense_w13, dense_w2)

    def hf_block(x):
        return hf(x[None])

    return {"ours": ours, "dense": dense, "hf": hf_block}


def time_interleaved(fns, x, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 1024])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fns = build(args.hidden, args.intermediate, args.experts, args.top_k)
    print(f"MoE layer: hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts, "
          f"top-{args.top_k}, fp32, {args.threads} threads")
    rows = []
    for n in tqdm(args.tokens, desc="token counts"):
        x = torch.randn(n, args.hidden)
        repeats = max(5, min(50, 4096 // max(n, 1)))
        t = time_interleaved(fns, x, repeats)
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append((n, med))
    print(f"{'tokens':>7} {'ours ms':>9} {'dense ms':>9} {'HF ms':>9} {'ours/dense':>11} {'HF/ours':>8}")
    for n, med in rows:
        print(f"{n:>7} {med['ours']*1e3:>9.2f} {med['dense']*1e3:>9.2f} {med['hf']*1e3:>9.2f} "
              f"{med['ours']/med['dense']:>11.2f} {med['hf']/med['ours']:>8.2f}")
    print("targets: ours/dense <= 1.3 and HF/ours >= 1.5 at >= 256 tokens")


if __name__ == "__main__":
    main()
