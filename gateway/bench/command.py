"""`moe-serve bench`'s arguments and handler: argparse namespace → BenchConfig → run → outputs.

Imports only the standard library and the config at module level, so `moe-serve --help` stays
instant; the runner (aiohttp, grpc, tqdm) and matplotlib load when a benchmark runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from gateway.bench.config import (
    LATENCY_METRICS,
    BenchConfig,
    DatasetConfig,
    LoadConfig,
    ReportConfig,
    TargetConfig,
    parse_float_list,
    parse_goodput,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--backend", choices=("http", "grpc"), default="http",
                        help="OpenAI /v1/completions over HTTP, or moe_serve.v1 GenerateStream over gRPC")
    target.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="the server's root URL for HTTP (default http://127.0.0.1:8000)")
    target.add_argument("--grpc-address", default="127.0.0.1:9000",
                        help="HOST:PORT of the gRPC proxy (default 127.0.0.1:9000)")
    target.add_argument("--model", default=None,
                        help="model name to send (default: the one the server lists)")
    target.add_argument("--api-key", default=None,
                        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY, else none)")
    target.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (default 0, greedy)")
    target.add_argument("--request-timeout-s", type=float, default=600.0,
                        help="a request taking longer fails (default 600)")

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=("random", "file"), default="random",
                      help="random token ids, or prompts from --dataset-path (default random)")
    data.add_argument("--dataset-path", default=None,
                      help='.jsonl ({"prompt": text or ids, "output_len": N} per line) or a text file, '
                           "one prompt per line")
    data.add_argument("--num-prompts", type=int, default=100, help="requests to send (default 100)")
    data.add_argument("--random-input-len", type=int, default=128, help="prompt tokens (default 128)")
    data.add_argument("--random-output-len", type=int, default=64,
                      help="tokens to generate, exactly (ignore_eos) (default 64)")
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="draw lengths uniformly from [len·(1−r), len·(1+r)] (default 0: fixed)")
    data.add_argument("--vocab-size", type=int, default=256,
                      help="random token ids are drawn from [0, N) (default 256)")
    data.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals (default 0)")

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="requests per second (default inf: all at once, see --max-concurrency)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier, >1 steadier")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="requests in flight at most (with an infinite rate: a fixed-concurrency test)")
    load.add_argument("--num-warmups", type=int, default=0,
                      help="requests sent first and left out of the results (default 0)")
    load.add_argument("--max-duration-s", type=float, default=None,
                      help="send no new request after this many seconds; in-flight ones finish")
    load.add_argument("--sweep-rates", default="", metavar="R1,R2,...",
                      help="one run per request rate, e.g. 1,2,4; --plot then plots against the rate")

    report = parser.add_argument_group("report")
    report.add_argument("--percentile-metrics", default=",".join(LATENCY_METRICS),
                        help=f"metrics to report (default {','.join(LATENCY_METRICS)})")
    report.add_argument("--metric-percentiles", default="50,90,99", help="percentiles (default 50,90,99)")
    report.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    report.add_argument("--result-file", default=None, help="write the results as JSON here")
    report.add_argument("--plot", default=None, metavar="PNG", help="write a PNG plot here")
    report.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Raises ValueError naming a bad option."""
    return BenchConfig(
        target=TargetConfig(
            backend=args.backend, base_url=args.base_url, grpc_address=args.grpc_address, model=args.model,
            api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None, temperature=args.temperature,
            request_timeout_s=args.request_timeout_s,
        ),
        dataset=DatasetConfig(
            name=args.dataset_name, path=args.dataset_path, num_prompts=args.num_prompts,
            input_len=args.random_input_len, output_len=args.random_output_len,
            range_ratio=args.random_range_ratio, vocab_size=args.vocab_size, seed=args.seed,
        ),
        load=LoadConfig(
            request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
            num_warmups=args.num_warmups, max_duration_s=args.max_duration_s, seed=args.seed,
        ),
        report=ReportConfig(
            percentiles=parse_float_list(args.metric_percentiles, "--metric-percentiles"),
            percentile_metrics=tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip()),
            goodput_slos_ms=parse_goodput(args.goodput), result_file=args.result_file, plot_file=args.plot,
            progress=not args.disable_tqdm,
        ),
        sweep_rates=parse_float_list(args.sweep_rates, "--sweep-rates"),
    )


def run_bench(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"moe-serve bench: {exc}", file=sys.stderr)
        return 2

    from gateway.bench.report import format_report
    from gateway.bench.result_file import write_result
    from gateway.bench.runner import run

    try:
        results = run(config)
    except (OSError, ValueError, TimeoutError) as exc:  # nothing listening, a bad dataset file, ...
        print(f"moe-serve bench: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moe-serve bench: interrupted; no results written", file=sys.stderr)
        return 130
    for result in results:
        title = "Serving Benchmark Result"
        if config.sweep_rates:
            title += f" @ {result.request_rate:g} req/s"
        print(format_report(result.summary, title=title, records=result.records), flush=True)
    if config.report.result_file:
        print(f"results: {write_result(config.report.result_file, config, results)}")
    if config.report.plot_file:
        from gateway.bench.plot import plot_run, plot_sweep

        try:
            out = (plot_sweep(results, config.report.plot_file, config) if config.sweep_rates
                   else plot_run(results[0], config.report.plot_file, config))
        except ImportError as exc:  # matplotlib comes with the `bench` extra
            print(f"moe-serve bench: no plot ({exc}); pip install 'moe-serve[bench]'", file=sys.stderr)
            return 1
        print(f"plot: {out}")
    return 0 if all(r.summary.completed for r in results) else 1
