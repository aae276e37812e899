"""The whole stack against HF `generate`: tokens/s of `moe-serve serve` at concurrency 16 vs
transformers one request at a time, on the demo model, measured in one run.

Run from the repository root: `python -m tests.bench.bench_stack` (`--quick`: fewer requests).
Not a test: nothing here asserts a time.

    moe-serve    the default `moe-serve serve` (1 attention + 2 expert workers, CPU, the demo
                 checkpoint: hidden 256, 4 layers, 8 experts top-2) as a subprocess, loaded by
                 `moe-serve bench` over HTTP: random prompts of --input-len tokens, exactly
                 --output-len generated (ignore_eos), --concurrency requests in flight
    HF generate  MixtralForCausalLM on the same checkpoint in this process, greedy, one prompt at
                 a time (what a user without a server does), the same lengths

Both run with the machine otherwise idle (the server is started before, and stopped after, its
own measurement; HF runs after it is gone). Issue 15's goal: at least 2× HF's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.e2e.conftest import free_port
from tests.serve_process import MOE_SERVE, ServeProcess

TARGET = 2.0
READY_TIMEOUT_S = 300.0


def moe_serve_throughput(args, model_dir: Path, tmp: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ServeProcess(["--model", str(model_dir), "--model-name", "demo", "--port", str(port),
                           "--grpc-port", str(free_port()), "--metrics-port", "0",
                           "--graceful-shutdown-timeout-s", "5"], tmp / "serve.log")
    try:
        server.wait_ready(url, READY_TIMEOUT_S)
        result = tmp / "bench.json"
        cmd = [MOE_SERVE, "bench", "--disable-tqdm", "--base-url", url, "--model", "demo",
               "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--max-concurrency", str(args.concurrency),
               "--num-warmups", "4", "--result-file", str(result)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if out.returncode:
            sys.exit(f"moe-serve bench failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return json.loads(result.read_text())["runs"][0]
    finally:
        server.stop()


def hf_throughput(args, model_dir: Path) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = hf.config.vocab_size
    prompts = [torch.randint(3, vocab, (1, args.input_len), generator=gen) for _ in range(args.hf_prompts)]
    with torch.no_grad():
        hf.generate(prompts[0], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)  # warm
        t0 = time.perf_counter()
        tokens = 0
        for ids in prompts:
            out = hf.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                              do_sample=False, eos_token_id=None, pad_token_id=0)
            tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - t0), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int,
                    help="requests through moe-serve (default 96; 32 with --quick)")
    ap.add_argument("--hf-prompts", type=int, help="prompts HF generates (default 12; 4 with --quick)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    args.num_prompts = args.num_prompts or (32 if args.quick else 96)
    args.hf_prompts = args.hf_prompts or (4 if args.quick else 12)
    from transformers.utils import logging as hf_logging

    from gateway.demo_checkpoint import write_demo_checkpoint

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"whole stack vs HF generate: demo model, CPU, {args.input_len} tokens in / {args.output_len} out; "
          f"load average at start {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = write_demo_checkpoint(tmp / "demo", progress=False)
        run = moe_serve_throughput(args, model_dir, tmp)
        hf_tps, hf_tokens = hf_throughput(args, model_dir)
    ours = run["output_throughput"]
    print(f"moe-serve serve (1 attention + 2 expert workers), concurrency {args.concurrency}: "
          f"{run['completed']} requests, {ours:.1f} output tok/s, TPOT p50 {run['median_tpot_ms']:.1f} ms, "
          f"failed {run['failed']}")
    print(f"HF generate, one request at a time: {hf_tokens} tokens, {hf_tps:.1f} tok/s")
    ratio = ours / hf_tps
    verdict = "PASS" if ratio >= TARGET else "MISS"
    print(f"ratio moe-serve / HF generate: {ratio:.2f} (goal >= {TARGET:g}: {verdict})")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
