"""`moe-serve bench`'s runner against an in-process client: bounds, warm-up, and the CLI's errors.

The client here is a local implementation of the runner's `Client` seam (it sleeps instead of
calling a server); the e2e test runs the real clients against a real server.
"""

from __future__ import annotations

import asyncio
import json
import socket

from gateway.bench.config import BenchConfig, DatasetConfig, LoadConfig, ReportConfig
from gateway.bench.dataset import BenchRequest, random_requests
from gateway.bench.request_record import RequestRecord
from gateway.bench.result_file import result_json
from gateway.bench.runner import run_one, send_all
from gateway.cli import main


class SleepyClient:
    """Answers each request after `delay_s` with its exact token counts; counts what is in flight."""

    def __init__(self, delay_s: float = 0.01) -> None:
        self.delay_s = delay_s
        self.in_flight = self.peak = self.sent = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, request: BenchRequest, start_s: float) -> RequestRecord:
        self.sent += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        return RequestRecord(ok=True, start_s=start_s, latency_s=self.delay_s, chunk_times_s=(self.delay_s,),
                             prompt_tokens=request.input_len or 0, output_tokens=request.output_len)


def requests(n: int) -> list[BenchRequest]:
    return random_requests(DatasetConfig(num_prompts=n, input_len=4, output_len=3))


def test_max_concurrency_bounds_requests_in_flight():
    client = SleepyClient()
    records, _ = asyncio.run(send_all(client, requests(40), [0.0] * 40, max_concurrency=3))
    assert len(records) == 40 and client.sent == 40
    assert client.peak == 3


def test_without_a_bound_everything_is_in_flight_at_once():
    client = SleepyClient(delay_s=0.05)
    asyncio.run(send_all(client, requests(25), [0.0] * 25, max_concurrency=None))
    assert client.peak == 25


def test_max_duration_stops_sending_and_lets_in_flight_requests_finish():
    client = SleepyClient(delay_s=0.05)
    offsets = [i * 0.01 for i in range(10_000)]  # 100 s of arrivals
    records, _ = asyncio.run(send_all(client, requests(10_000), offsets, max_concurrency=None,
                                      max_duration_s=0.3))
    assert 0 < len(records) < 10_000 and len(records) == client.sent
    assert all(r.ok for r in records) and client.in_flight == 0
    assert max(r.start_s for r in records) < 0.3  # nothing is sent after the bound


def test_warmups_are_kept_apart_from_the_results():
    cfg = BenchConfig(dataset=DatasetConfig(num_prompts=6, input_len=4, output_len=3),
                      load=LoadConfig(num_warmups=4, max_concurrency=2), report=ReportConfig(progress=False))
    client = SleepyClient()
    result = asyncio.run(run_one(client, requests(6), cfg.load, cfg, progress=False))
    assert client.sent == 10
    assert len(result.records) == 6 and len(result.warmup_records) == 4
    assert result.summary.total_input_tokens == 24 and result.summary.total_output_tokens == 18
    run = result_json(cfg, [result])["runs"][0]
    assert (run["warmup_input_tokens"], run["warmup_output_tokens"]) == (16, 12)
    assert run["request_rate"] == "inf"  # JSON has no infinity
    json.dumps(result_json(cfg, [result]), allow_nan=False)


def test_cli_refuses_bad_options_with_status_2(capsys):
    assert main(["bench", "--goodput", "ttft:fast"]) == 2
    assert "METRIC:MS" in capsys.readouterr().err
    assert main(["bench", "--request-rate", "0"]) == 2
    assert "request_rate" in capsys.readouterr().err


def test_cli_reports_a_server_that_is_not_there(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        status = main(["bench", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2",
                       "--disable-tqdm"])
    assert status == 1
    err = capsys.readouterr().err
    assert "moe-serve bench:" in err and "Traceback" not in err
