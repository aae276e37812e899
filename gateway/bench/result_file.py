"""The result file: the options, each run's summary (vLLM-style flat keys) and its per-request data.

Warm-up requests are reported apart (`warmup_input_tokens`, `warmup_output_tokens`): they are not
in the summary, but the server counted them, so `total + warmup` is what its metrics moved by.
Infinite rates are written as the string "inf" (JSON has no infinity).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.bench.config import BenchConfig
from gateway.bench.runner import RunResult


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "nan"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_json(result: RunResult) -> dict:
    ok_warmups = [r for r in result.warmup_records if r.ok]
    return {
        "request_rate": result.request_rate,
        "max_concurrency": result.max_concurrency,
        **result.summary.to_json(),
        "num_warmups": len(result.warmup_records),
        "warmup_failed": len(result.warmup_records) - len(ok_warmups),
        "warmup_input_tokens": sum(r.prompt_tokens for r in ok_warmups),
        "warmup_output_tokens": sum(r.output_tokens for r in ok_warmups),
        "start_times": [r.start_s for r in result.records],
        "input_lens": [r.prompt_tokens for r in result.records],
        "output_lens": [r.output_tokens for r in result.records],
        "ttfts": [r.ttft_s for r in result.records],
        "itls": [r.itl_s for r in result.records],
        "e2els": [r.latency_s for r in result.records],
        "errors": [r.error for r in result.records],
    }


def result_json(config: BenchConfig, results: Sequence[RunResult]) -> dict:
    options = dataclasses.asdict(config)
    options["target"].pop("api_key", None)  # never write a secret to disk
    return _finite({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": options,
                    "runs": [run_json(r) for r in results]})


def write_result(path: str | Path, config: BenchConfig, results: Sequence[RunResult]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result_json(config, results), indent=1, allow_nan=False) + "\n")
    return out
