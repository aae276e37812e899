"""The benchmark's options: one frozen dataclass per concern, validated when built.

Names follow `vllm bench serve` where it has one (num_prompts, request_rate, burstiness,
max_concurrency, random_input_len, random_range_ratio, goodput), so runs are easy to compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BACKENDS = ("http", "grpc")
DATASETS = ("random", "file")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")  # the ones a report and an SLO can name


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """Where the requests go and how."""

    backend: str = "http"
    base_url: str = "http://127.0.0.1:8000"  # the app's root; requests go to {base_url}/v1/completions
    grpc_address: str = "127.0.0.1:9000"
    model: str | None = None  # None: the one the server lists (HTTP) / the one it serves (gRPC)
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.0  # greedy by default: sampling cost is then the same for every request
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """What is sent: random token ids of chosen lengths, or prompts read from a file."""

    name: str = "random"
    path: str | None = None  # for name="file": JSONL ({"prompt": ..., "output_len": ...}) or text lines
    num_prompts: int = 100
    input_len: int = 128  # random prompts: tokens per prompt (the centre of the range)
    output_len: int = 64  # tokens to generate (exact: ignore_eos), for file prompts without their own
    range_ratio: float = 0.0  # lengths uniform in [len * (1 - r), len * (1 + r)]; 0: fixed
    vocab_size: int = 256  # random ids are drawn from [0, vocab_size); 256 fits any byte-level vocab
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.name!r}")
        if self.name == "file" and not self.path:
            raise ValueError("the file dataset needs a path (--dataset-path)")
        for name in ("num_prompts", "input_len", "output_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """When requests are sent, and when the run stops."""

    request_rate: float = math.inf  # requests/s; inf: all at once (bounded by max_concurrency)
    burstiness: float = 1.0  # gamma shape of inter-arrival times: 1 is Poisson, < 1 burstier
    max_concurrency: int | None = None  # requests in flight at most; None: unbounded
    num_warmups: int = 0  # requests sent (and waited for) first, left out of the results
    max_duration_s: float | None = None  # no new request after this long; in-flight ones finish
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf for all at once), got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_warmups < 0:
            raise ValueError(f"num_warmups must be >= 0, got {self.num_warmups}")
        if self.max_duration_s is not None and not self.max_duration_s > 0:
            raise ValueError(f"max_duration_s must be > 0, got {self.max_duration_s}")


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """What the summary contains and where it goes."""

    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    percentile_metrics: tuple[str, ...] = LATENCY_METRICS
    goodput_slos_ms: tuple[tuple[str, float], ...] = ()  # (metric, limit in ms): a good request meets all
    result_file: str | None = None
    plot_file: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.percentiles or any(not 0 < p <= 100 for p in self.percentiles):
            raise ValueError(f"percentiles must be in (0, 100], got {self.percentiles}")
        for name in (*self.percentile_metrics, *(m for m, _ in self.goodput_slos_ms)):
            if name not in LATENCY_METRICS:
                raise ValueError(f"unknown metric {name!r}: expected one of {LATENCY_METRICS}")
        if any(not limit > 0 for _, limit in self.goodput_slos_ms):
            raise ValueError(f"SLO limits must be > 0 ms, got {self.goodput_slos_ms}")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    target: TargetConfig = field(default_factory=TargetConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    sweep_rates: tuple[float, ...] = ()  # one run per rate (replacing load.request_rate), plotted against it

    def __post_init__(self) -> None:
        if any(not r > 0 for r in self.sweep_rates):
            raise ValueError(f"sweep rates must be > 0, got {self.sweep_rates}")


def parse_goodput(items: list[str] | tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """["ttft:500", "tpot:50"] → (("ttft", 500.0), ("tpot", 50.0)); ValueError names a bad item."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            limit = float(value) if sep else math.nan
        except ValueError:
            limit = math.nan
        if name not in LATENCY_METRICS or not (limit > 0 and math.isfinite(limit)):
            raise ValueError(f"bad goodput SLO {item!r}: expected METRIC:MS with METRIC one of "
                             f"{', '.join(LATENCY_METRICS)} and MS > 0, e.g. ttft:500")
        slos[name] = limit
    return tuple(slos.items())


def parse_float_list(text: str, what: str) -> tuple[float, ...]:
    """"1,2,4" → (1.0, 2.0, 4.0); "inf" is allowed; ValueError names `what`."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"bad {what} {text!r}: expected comma-separated numbers, e.g. 1,2,4") from None
