"""The `moe-serve` command line: one parser, one small handler per subcommand.

Each subcommand is an `add_<name>_command(subparsers)` function that declares its arguments and
sets `handler`; the handler takes the parsed namespace, does its work through library
functions with typed arguments, and returns the exit status. Heavy imports (torch, Ray) happen
inside handlers so `moe-serve --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.admission import DEFAULT_MAX_QUEUED_REQUESTS  # standard library only: --help stays instant
from gateway.elastic_flags import add_elastic_arguments, elastic_from_args  # and dataclasses


def add_demo_model_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-model", help="write the built-in demo checkpoint (small random Mixtral) to a directory",
        description="Write the built-in demo checkpoint: a small random Mixtral-shaped HuggingFace "
                    "checkpoint with a trained byte-level BPE tokenizer. Prints its path. An up-to-date "
                    "one is kept; a directory holding anything else is refused.",
    )
    parser.add_argument(
        "dir", nargs="?", type=Path, default=None,
        help="output directory (default: $MOE_SERVE_DEMO_DIR or ~/.cache/moe-serve/demo-model; with "
             "--router-skew S, a sibling named demo-model-router-skew-S)",
    )
    parser.add_argument("--output", "-o", type=Path, default=None, metavar="DIR", help="same as DIR")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    add_router_skew_argument(parser)
    parser.set_defaults(handler=run_demo_model)


def add_router_skew_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router-skew", type=float, default=0.0, metavar="S",
                        help="tilt every layer's router toward a quarter of its experts so expert load "
                             "is visibly unbalanced: 0 = even (default), 1 = the hot quarter gets about "
                             "60%% of the top-k picks, 2 = about 75%% (see gateway/demo_router_skew.py)")


def run_demo_model(args: argparse.Namespace) -> int:
    from gateway.demo_checkpoint import ensure_demo_checkpoint
    from gateway.demo_router_skew import check_router_skew

    try:
        if args.dir is not None and args.output is not None and args.dir != args.output:
            raise ValueError("give the output directory once: DIR or --output DIR")
        check_router_skew(args.router_skew)
    except ValueError as exc:
        print(f"moe-serve demo-model: {exc}", file=sys.stderr)
        return 2
    try:
        out = ensure_demo_checkpoint(args.dir or args.output, seed=args.seed, router_skew=args.router_skew)
    except FileExistsError as exc:
        print(f"moe-serve demo-model: {exc}", file=sys.stderr)
        return 1
    print(out.resolve())
    return 0


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over OpenAI-compatible HTTP and gRPC (the demo model by default)",
        description="Start (or join) a Ray cluster and serve a Mixtral-style checkpoint with Ray Serve: "
                    "OpenAI-compatible HTTP (/v1/completions, /v1/chat/completions, /v1/models, /health, "
                    "/ready) and gRPC. Without --model the built-in demo checkpoint is written (once) "
                    "and served. Ctrl-C stops.",
    )
    parser.add_argument("--model", type=Path, default=None,
                        help="HF-format Mixtral checkpoint directory (default: the demo checkpoint)")
    add_router_skew_argument(parser)  # of the demo checkpoint: only without --model
    parser.add_argument("--model-name", default=None,
                        help="the name clients send as `model` (default: the checkpoint directory's name)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster ('auto' or HOST:PORT) instead of starting one here")
    parser.add_argument("--attention-workers", type=int, default=1,
                        help="attention workers (data-parallel ranks) per model group (default 1)")
    parser.add_argument("--expert-workers", type=int, default=2,
                        help="expert workers per model group; 0 runs the whole model inside the engine "
                             "replica (default 2)")
    parser.add_argument("--expert-replicas", default="", metavar="L:E=N,...",
                        help="extra copies of hot experts, e.g. '0:3=2,1:5=2' (layer 0 expert 3 twice, ...)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where each worker computes: auto = the GPU Ray gave it, else the CPU "
                             "(default auto); cuda needs --gpus or --gpus-per-worker")
    parser.add_argument("--dtype", default="auto",
                        help="auto, float32, bfloat16 or float16 (default auto: the checkpoint's "
                             "torch_dtype on a GPU, float32 on a CPU)")
    parser.add_argument("--max-num-seqs", type=int, default=64,
                        help="running sequences per attention worker (default 64)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length limit (default: the model's max_position_embeddings)")
    parser.add_argument("--gpus", action="store_true",
                        help="one GPU per worker, and for the engine replica with --expert-workers 0 "
                             "(default: CPU only); same as --gpus-per-worker 1")
    parser.add_argument("--gpus-per-worker", type=float, default=None, metavar="F",
                        help="GPUs each worker reserves, a fraction to share one GPU (0.25: one "
                             "attention + three expert workers on one GPU; rows then move through "
                             "host memory instead of NCCL)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                        help="fraction of each worker's GPU share for its weights, activations and KV "
                             "cache; the KV cache gets what is left after the weights (default 0.9)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every step eagerly: no CUDA graphs for decode steps (captured at start "
                             "by a single-process engine on a GPU)")
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV-cache blocks of 16 tokens per attention worker (default: 1024 on a CPU, "
                             "what fits on a GPU)")
    parser.add_argument("--cpus-per-worker", type=float, default=0.25,
                        help="CPUs Ray reserves per worker and for the engine replica (default 0.25)")
    parser.add_argument("--engine-replicas", type=int, default=None,
                        help="model groups, fixed (default 1); see --max-replicas to autoscale instead")
    add_autoscaling_arguments(parser)
    add_elastic_arguments(parser)
    parser.add_argument("--step-timeout-s", type=float, default=None,
                        help="a model step taking longer counts as a stalled worker and triggers recovery "
                             "(default 60)")
    parser.add_argument("--max-recoveries", type=int, default=None,
                        help="model-group restarts allowed within 5 minutes after worker faults; past that "
                             "requests fail with 503 and /ready turns red (default 3)")
    parser.add_argument("--placement-strategy", default="PACK",
                        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                        help="how a model group's workers are placed over nodes (default PACK)")
    parser.add_argument("--attention-resource", action="append", default=[], metavar="NAME=AMOUNT",
                        help="custom Ray resource each attention worker needs, to steer it to a node pool "
                             "(repeatable), e.g. moe_attention=1")
    parser.add_argument("--expert-resource", action="append", default=[], metavar="NAME=AMOUNT",
                        help="custom Ray resource each expert worker needs (repeatable), e.g. moe_expert=1")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP and gRPC bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, default=9000, help="gRPC port (default 9000)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="where this cluster's node exports Prometheus metrics (default 8080, as KubeRay "
                             "expects; 0: none); with --address, the nodes' own `ray start` ports apply")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route and RPC but /health, /ready "
                             "and gRPC health (default: $MOE_SERVE_API_KEY; none: no authentication)")
    parser.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                        help="requests that may wait per model group; more get 429 + Retry-After "
                             f"(default {DEFAULT_MAX_QUEUED_REQUESTS})")
    parser.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                        help="every request's deadline: past it the request is aborted and gets 408 "
                             "(clients may ask for less with X-Request-Timeout; default: none)")
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import os

    from gateway.app import ServeOptions
    from gateway.cluster_fit import ClusterTooSmall
    from gateway.serve_command import parse_expert_replicas
    from gateway.serve_command import run_serve as serve

    try:
        model_dir = demo_or_model_dir(args)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} holds no config.json: not a HuggingFace checkpoint directory")
        options = ServeOptions(
            model_dir=str(model_dir), model_name=args.model_name,
            num_attention_workers=args.attention_workers, num_expert_workers=args.expert_workers,
            expert_replicas=parse_expert_replicas(args.expert_replicas), dtype=args.dtype,
            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, device=args.device,
            num_gpus_per_worker=gpus_per_worker(args), gpu_memory_utilization=args.gpu_memory_utilization,
            num_kv_blocks=args.num_kv_blocks, enforce_eager=args.enforce_eager,
            num_cpus_per_worker=args.cpus_per_worker, num_engine_replicas=args.engine_replicas or 1,
            autoscaling=autoscaling_from_args(args), elastic=elastic_from_args(args),
            graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
            max_queued_requests=args.max_queued_requests, request_timeout_s=args.request_timeout,
            api_key=args.api_key or os.environ.get("MOE_SERVE_API_KEY") or None,
            host=args.host, port=args.port, grpc_port=args.grpc_port,
            placement_strategy=args.placement_strategy,
            **{name: value for name, value in (("step_timeout_s", args.step_timeout_s),
                                               ("max_recoveries", args.max_recoveries)) if value is not None},
            attention_resources=parse_resources(args.attention_resource),
            expert_resources=parse_resources(args.expert_resource),
        )
    except (ValueError, FileExistsError) as exc:
        print(f"moe-serve serve: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(options, address=args.address, metrics_port=args.metrics_port)
    except ClusterTooSmall as exc:  # a set-up error, not a crash: no traceback
        print(f"moe-serve serve: {exc}", file=sys.stderr)
        return 2


def demo_or_model_dir(args: argparse.Namespace) -> Path:
    """--model, else the demo checkpoint of --router-skew (each skew has its own cache directory)."""
    from gateway.demo_checkpoint import ensure_demo_checkpoint
    from gateway.demo_router_skew import check_router_skew

    if args.model is None:
        return ensure_demo_checkpoint(router_skew=args.router_skew)
    if check_router_skew(args.router_skew):
        raise ValueError("--router-skew shapes the demo checkpoint; with --model, write one with "
                         "`moe-serve demo-model --router-skew S DIR` and serve --model DIR")
    return args.model


def gpus_per_worker(args: argparse.Namespace) -> float:
    """--gpus is --gpus-per-worker 1; asking for both is a contradiction, not a preference."""
    if args.gpus and args.gpus_per_worker is not None:
        raise ValueError("give --gpus or --gpus-per-worker, not both")
    return 1.0 if args.gpus else (args.gpus_per_worker or 0.0)


def add_autoscaling_arguments(parser: argparse.ArgumentParser) -> None:
    from gateway.autoscaling import AutoscalingOptions  # dataclasses only: --help stays instant

    d = AutoscalingOptions()
    group = parser.add_argument_group(
        "autoscaling", "Given --max-replicas, Serve adds and removes whole model groups (engine replicas) "
                       "to keep about --target-ongoing-requests streams on each; a removed group is "
                       "drained first (--graceful-shutdown-timeout-s).")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="autoscale the engine deployment up to this many model groups (default: off)")
    group.add_argument("--min-replicas", type=int, default=None,
                       help=f"fewest model groups while autoscaling (default {d.min_replicas})")
    group.add_argument("--target-ongoing-requests", type=float, default=None,
                       help="concurrent requests per model group to aim for "
                            f"(default {d.target_ongoing_requests:g})")
    group.add_argument("--upscale-delay-s", type=float, default=None,
                       help="demand must stay above target this long before a group is added "
                            f"(default {d.upscale_delay_s:g})")
    group.add_argument("--downscale-delay-s", type=float, default=None,
                       help="... and below it this long before one is removed "
                            f"(default {d.downscale_delay_s:g})")
    group.add_argument("--graceful-shutdown-timeout-s", type=float, default=60.0,
                       help="how long a model group being removed may finish its streams (default 60)")


AUTOSCALING_FLAGS = {"min_replicas": "--min-replicas", "target_ongoing_requests": "--target-ongoing-requests",
                     "upscale_delay_s": "--upscale-delay-s", "downscale_delay_s": "--downscale-delay-s"}


def autoscaling_from_args(args: argparse.Namespace):
    """The autoscaling flags → AutoscalingOptions, or None (a fixed number of model groups)."""
    from gateway.autoscaling import AutoscalingOptions

    given = {name: getattr(args, name) for name in AUTOSCALING_FLAGS if getattr(args, name) is not None}
    if args.max_replicas is None:
        if given:
            flags = ", ".join(AUTOSCALING_FLAGS[n] for n in given)
            raise ValueError(f"{flags} only apply with --max-replicas")
        return None
    if args.engine_replicas is not None:
        raise ValueError("--engine-replicas fixes the number of model groups; with --max-replicas "
                         "use --min-replicas instead")
    return AutoscalingOptions(max_replicas=args.max_replicas, **given)


def parse_resources(items: list[str]) -> dict[str, float]:
    """["moe_expert=1", ...] → {"moe_expert": 1.0}."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad resource {item!r}: expected NAME=AMOUNT") from None
        if not name or value <= 0:
            raise ValueError(f"bad resource {item!r}: expected NAME=AMOUNT with AMOUNT > 0")
        out[name] = value
    return out


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    from gateway.bench.command import add_arguments  # standard library only: --help stays instant

    parser = subparsers.add_parser(
        "bench", help="load-test a running server over HTTP or gRPC (vLLM-style latency and throughput)",
        description="Send generated or file prompts to a running moe-serve (or any OpenAI-compatible) "
                    "server at a Poisson/gamma request rate or a fixed concurrency, and report completed "
                    "and failed requests, request and token throughput, TTFT, TPOT, ITL and end-to-end "
                    "latency percentiles and goodput under SLOs; optionally as JSON and a PNG plot.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from gateway.bench.command import run_bench as bench

    return bench(args)


# Subcommands in the order `--help` lists them. `serve` (and `bench`) register here, each as an
# `add_<name>_command` function like the one above.
COMMANDS = (
    add_serve_command,
    add_demo_model_command,
    add_bench_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-serve", description="Serve Mixtral-style MoE models on a Ray cluster.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
