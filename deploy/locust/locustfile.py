"""Locust load test of moe-serve's OpenAI API, for people who prefer Locust to `moe-serve bench`.

    pip install locust
    MOE_SERVE_MODEL=demo locust -f deploy/locust/locustfile.py --host http://127.0.0.1:8000
    # headless: ... --headless -u 32 -r 4 -t 5m --csv results/moe-serve

Each simulated user alternates between a plain completion and a streamed chat completion. The
streamed one reports two extra entries to Locust's statistics: "time to first token" (request
sent → first SSE chunk with text) and "inter-token latency" (mean gap between later chunks),
so the web UI shows the same quantities as the server's Prometheus histograms, measured
from the client side. A response without usage, or an SSE `error` event, counts as a failure.

Environment: MOE_SERVE_MODEL (the served model name, default "demo"), MOE_SERVE_API_KEY
(sent as a bearer token when set), MOE_SERVE_MAX_TOKENS (default 64).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

MODEL = os.environ.get("MOE_SERVE_MODEL", "demo")
API_KEY = os.environ.get("MOE_SERVE_API_KEY", "")
MAX_TOKENS = int(os.environ.get("MOE_SERVE_MAX_TOKENS", "64"))
PROMPTS = (
    "The capital of France is",
    "Write a haiku about mixture-of-experts models.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than one hundred.",
    "Translate 'good morning' into Spanish, French and German.",
)


class OpenAIUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    @task(2)
    def completion(self) -> None:
        body = {"model": MODEL, "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS,
                "temperature": 0.7}
        with self.client.post("/v1/completions", json=body, name="/v1/completions",
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif not response.json().get("usage", {}).get("completion_tokens"):
                response.failure("no completion tokens in usage")

    @task(1)
    def chat_stream(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": random.choice(PROMPTS)}],
                "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        token_times: list[float] = []
        with self.client.post("/v1/chat/completions", json=body, name="/v1/chat/completions (stream)",
                              stream=True, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            error = read_stream(response.iter_lines(), token_times)
            if error:
                response.failure(error)
                return
        if token_times:
            self.report("time to first token", token_times[0] - start)
        if len(token_times) > 1:
            self.report("inter-token latency", (token_times[-1] - token_times[0]) / (len(token_times) - 1))

    def report(self, name: str, seconds: float) -> None:
        self.environment.events.request.fire(request_type="SSE", name=name, response_time=seconds * 1000.0,
                                             response_length=0, exception=None, context={})


def read_stream(lines, token_times: list[float]) -> str | None:
    """Consume an OpenAI SSE stream, stamping each chunk that carries text; an error message or None."""
    done = usage = False
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            return f"stream error: {chunk['error'].get('message')}"
        if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
            token_times.append(time.perf_counter())
        usage = usage or bool(chunk.get("usage"))
    if not done:
        return "stream ended without [DONE]"
    return None if usage else "no usage chunk (stream_options.include_usage)"
