"""MoE layer speed: ours vs a dense SwiGLU of equal active FLOPs vs HF's MixtralSparseMoeBlock.

Run: `make bench` (or `python tests/bench/bench_moe_layer.py`). Prints median times and the
ratios ours/dense and HF/ours; timings are interleaved (ours, dense, HF, ours, ...) in one
process so machine noise hits all three alike. Not a test: nothing here asserts a time.

Dense-equivalent: one SwiGLU of width top_k × intermediate_size, which does exactly the
matmul FLOPs of the routed experts of a top-k MoE layer without any routing work.

On a GPU (`--device cuda`, or `moe_layer_gpu_report` from tests/bench/bench_gpu.py): the
experts stage at Mixtral's full width in bf16, the per-expert loop against the grouped_mm
path, and the whole layer (route → dispatch → experts → combine, the implementation chosen as
in serving), each against its bound: the larger of the routed experts' weight bytes over the
copy bandwidth and their matmul FLOPs over the bf16 matmul rate, both measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from tqdm import tqdm

from tests.bench.bench_util import print_table
from workers.moe.block import moe_block
from workers.moe.dispatcher import LocalDispatcher
from workers.moe.experts import LayerExperts, experts_impl_for, run_experts, swiglu
from workers.moe.route import route

GPU_TOKENS = (1, 64, 1024, 4096)


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
    dispatcher = LocalDispatcher(len(experts.expert_ids))
    gate = hf.gate.weight.detach()
    dense_w13 = torch.randn(2 * top_k * inter, hidden) * 0.02
    dense_w2 = torch.randn(hidden, top_k * inter) * 0.02

    def ours(x):
        return moe_block(0, x, gate, top_k, dispatcher, experts)

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


def device_ms(fn, device: torch.device, repeats: int, rounds: int = 3) -> float:
    """Median over `rounds` of the mean time per call of `repeats` back-to-back calls.

    Timed from the host's side of the queue (CUDA events around the whole run, one sync at the
    end), so host overhead that the launches cannot hide counts, as it does in serving.
    """
    fn()
    synchronize(device)
    means = []
    for _ in range(rounds):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            means.append(start.elapsed_time(end) / repeats)
        else:
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            means.append((time.perf_counter() - t0) * 1e3 / repeats)
    return statistics.median(means)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, num_bytes: int = 1 << 30) -> float:
    """Bytes per second a device-to-device copy moves, reads plus writes (the roofline's memory side)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), device, repeats=10)
    return 2 * num_bytes / (ms / 1e3)


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """FLOP/s of one large square matmul (the roofline's compute side)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    ms = device_ms(lambda: a @ b, device, repeats=10)
    return 2 * n**3 / (ms / 1e3)


def moe_layer_gpu_report(device: torch.device, tokens: tuple[int, ...] = GPU_TOKENS, hidden: int = 4096,
                         inter: int = 14336, num_experts: int = 8, top_k: int = 2,
                         dtype: torch.dtype = torch.bfloat16, peak_n: int = 8192) -> list[dict]:
    """One row per token count: ms of the experts stage through the loop and through grouped_mm,
    ms of the whole MoE layer as served, the bound, and their ratios. Prints nothing."""
    device = torch.device(device)
    bandwidth, flops = copy_bandwidth(device), matmul_flops(device, dtype, peak_n)
    g = torch.Generator(device=device).manual_seed(0)
    experts = LayerExperts(
        tuple(range(num_experts)),
        (torch.randn(num_experts, 2 * inter, hidden, generator=g, device=device) * 0.02).to(dtype),
        (torch.randn(num_experts, hidden, inter, generator=g, device=device) * 0.02).to(dtype),
    )
    gate = (torch.randn(num_experts, hidden, generator=g, device=device) * 0.02).to(dtype)
    dispatcher = LocalDispatcher(len(experts.expert_ids))
    weight_bytes = 3 * hidden * inter * torch.empty(0, dtype=dtype).element_size()  # one expert
    rows = []
    with torch.inference_mode():
        for n in tokens:
            x = torch.randn(n, hidden, generator=g, device=device).to(dtype)
            x_M, plan = dispatcher.dispatch(0, x, route(x, gate, top_k))
            counts_E = plan.expert_counts_E
            experts_hit = sum(1 for c in plan.recv_expert_counts if c)
            repeats = max(10, min(100, 20_000 // max(n, 1)))
            loop = partial(run_experts, "loop", x_M, counts_E, experts)
            grouped = partial(run_experts, "grouped_mm", x_M, counts_E, experts)
            layer = partial(moe_block, 0, x, gate, top_k, dispatcher, experts)
            loop_ms, grouped_ms, layer_ms = (device_ms(f, device, repeats) for f in (loop, grouped, layer))
            bound_ms = 1e3 * max(experts_hit * weight_bytes / bandwidth,
                                 2 * n * top_k * 3 * hidden * inter / flops)
            rows.append({
                "tokens": n, "experts_hit": experts_hit, "impl": experts_impl_for(x_M, experts),
                "loop_ms": loop_ms, "grouped_ms": grouped_ms, "layer_ms": layer_ms, "bound_ms": bound_ms,
                "loop_over_grouped": loop_ms / grouped_ms, "grouped_over_bound": grouped_ms / bound_ms,
                "layer_over_bound": layer_ms / bound_ms,
                "copy_tb_s": bandwidth / 1e12, "matmul_tflops": flops / 1e12,
                "hidden": hidden, "intermediate": inter, "experts": num_experts, "top_k": top_k,
                "dtype": str(dtype).removeprefix("torch."),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            })
    return rows


def print_moe_layer_gpu_report(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"MoE layer on {r0['device']}: hidden {r0['hidden']}, intermediate "
          f"{r0['intermediate']}, {r0['experts']} experts, top-{r0['top_k']}, {r0['dtype']}; copy "
          f"{r0['copy_tb_s']:.2f} TB/s, matmul {r0['matmul_tflops']:.0f} TFLOP/s")
    print_table(
        ["tokens", "hit", "loop ms", "grouped ms", "layer ms", "bound ms", "loop/grouped", "grouped/bound",
         "layer/bound", "served by"],
        [[r["tokens"], r["experts_hit"], f"{r['loop_ms']:.3f}", f"{r['grouped_ms']:.3f}",
          f"{r['layer_ms']:.3f}", f"{r['bound_ms']:.3f}", f"{r['loop_over_grouped']:.2f}",
          f"{r['grouped_over_bound']:.2f}", f"{r['layer_over_bound']:.2f}", r["impl"]] for r in rows],
    )
    at_64 = [r for r in rows if r["tokens"] >= 64]
    if at_64:
        worst = max(r["layer_over_bound"] for r in at_64)
        print(f"target: the layer within 2x of its bound at >= 64 tokens: worst {worst:.2f} "
              f"{'PASS' if worst <= 2.0 else 'MISS'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 1024])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the full-width bf16 report (loop vs grouped_mm vs bound); "
                         "the sizes above are ignored")
    args = ap.parse_args()
    if args.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        print_moe_layer_gpu_report(moe_layer_gpu_report(device))
        return
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
