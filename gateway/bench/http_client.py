"""Streams `/v1/completions` over HTTP (Server-Sent Events) and times every chunk.

Each request asks for exactly `output_len` tokens (`ignore_eos`, our and vLLM's extension) and
for usage in the last chunk (`stream_options.include_usage`), so token counts are the server's
own. Every chunk with a choice is one step of the engine: its arrival time is a token time.
An HTTP error status, an `error` event inside the stream, a missing usage chunk or a stream
that ends without `[DONE]` each make the request a failure with the reason.
"""

from __future__ import annotations

import json
import time

import aiohttp

from gateway.bench.config import TargetConfig
from gateway.bench.dataset import BenchRequest
from gateway.bench.request_record import RequestRecord, failed

MAX_ERROR_CHARS = 300


class HttpClient:
    def __init__(self, target: TargetConfig, max_connections: int | None = None) -> None:
        self.target = target
        self.url = target.base_url.rstrip("/") + "/v1/completions"
        self.headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        # limit=0 is aiohttp's "no limit": with a bounded pool, requests would queue inside the
        # client and their TTFT would include that wait.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections or 0),
            timeout=aiohttp.ClientTimeout(total=target.request_timeout_s),
        )
        self.model = target.model

    async def start(self) -> None:
        """Learns the served model's name when none was given (GET /v1/models)."""
        if self.model is not None:
            return
        url = self.target.base_url.rstrip("/") + "/v1/models"
        async with self.session.get(url, headers=self.headers) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise ConnectionError(f"GET {url} answered {resp.status}: {body[:MAX_ERROR_CHARS]}")
            self.model = json.loads(body)["data"][0]["id"]

    async def close(self) -> None:
        await self.session.close()

    def body(self, request: BenchRequest) -> dict:
        prompt = request.prompt if isinstance(request.prompt, str) else list(request.prompt)
        return {"model": self.model, "prompt": prompt, "max_tokens": request.output_len,
                "temperature": self.target.temperature, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}

    async def send(self, request: BenchRequest, start_s: float) -> RequestRecord:
        """`start_s` is the send time on the run's clock; the record carries it unchanged."""
        t0 = time.perf_counter()
        chunk_times: list[float] = []
        usage = None
        try:
            async with self.session.post(self.url, json=self.body(request), headers=self.headers) as resp:
                if resp.status != 200:
                    text = await resp.text()
                    return failed(start_s, time.perf_counter() - t0,
                                  f"HTTP {resp.status}: {_error_message(text)}")
                done = False
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return failed(start_s, time.perf_counter() - t0,
                                      f"error event: {_error_message(data.decode(errors='replace'))}")
                    if chunk.get("choices"):
                        chunk_times.append(time.perf_counter() - t0)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            return failed(start_s, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
        latency = time.perf_counter() - t0
        if not done:
            return failed(start_s, latency, "the stream ended without [DONE]")
        if usage is None:
            return failed(start_s, latency, "no usage in the stream (stream_options.include_usage ignored?)")
        return RequestRecord(ok=True, start_s=start_s, latency_s=latency, chunk_times_s=tuple(chunk_times),
                             prompt_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"])


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:MAX_ERROR_CHARS]
    except (ValueError, KeyError, TypeError):
        return text[:MAX_ERROR_CHARS]
