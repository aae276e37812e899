"""The HTTP ingress in-process, without Ray: its FastAPI app over httpx's ASGI transport, in front of a
fake engine handle. Tokenizing is off the event loop; the 404 names the served model; a body sent as
another Content-Type is told so; /ready says "draining" during a drain."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import httpx
import pytest

from cluster.request_output import RequestOutput
from cluster.tokenizer import Tokenizer
from gateway import errors, ingress
from gateway.ingress import Ingress
from gateway.request_limits import max_prompt_chars
from tests.unit import gateway_fakes

MODEL = "demo"
MAX_MODEL_LEN = 4096  # the demo model's: its longest accepted text is 65,536 characters
SLOW_FACTOR = 5  # "a small multiple" of a short request's time alone
SLOWER = 4
DECODE_STEP_S = 0.02
LONG_DEADLINE_S = 30.0  # only breaks the deadlock of a tokenizer stuck on the event loop


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        result = self.fn(*args)
        return result if not asyncio.iscoroutine(result) else asyncio.ensure_future(result)


class _Stream:
    def __init__(self, outputs, delay_s: float):
        self.outputs = outputs
        self.delay_s = delay_s

    async def _gen(self):
        for out in self.outputs:
            await asyncio.sleep(self.delay_s)
            yield out

    def __aiter__(self):
        return self._gen()

    def cancel(self):
        pass


class FakeEngine:
    """An engine deployment handle that answers every request with one finished token after
    `delay_s` (about one decode step of the demo model)."""

    def __init__(self, ready: bool = True, delay_s: float = 0.0):
        self.is_ready = ready
        self.delay_s = delay_s
        self.requests = []
        self.generate = _Method(self._generate)
        self.abort = _Method(lambda request_id: None)
        self.ready = _Method(self._ready)

    def options(self, stream: bool):
        return self

    def _generate(self, request):
        self.requests.append(request)
        out = RequestOutput(request_id=request.request_id, token_ids=(5,), text="x", logprobs=(None,),
                            num_prompt_tokens=len(request.prompt_ids), num_output_tokens=1,
                            finished=True, finish_reason="length")
        return _Stream([out], self.delay_s)

    async def _ready(self):
        return self.is_ready


class GatedTokenizer:
    """The demo tokenizer; the long text is tokenized again and again until the short request has
    its answer (or a deadline passes), so the two surely overlap on any machine. Run on the event
    loop, the long one would keep the short one from ever finishing first. Each round tokenizes the
    text SLOWER times over, as a slower machine would: a tokenizer that holds the GIL then stalls
    the loop for longer than any short request takes."""

    def __init__(self, tokenizer: Tokenizer, long_text: str):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend
        self.long_text = long_text
        self.short_answered = threading.Event()
        self.long_started = threading.Event()
        self.long_done_at: float | None = None
        self.num_long_encodes = 0

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if text != self.long_text:
            return self.tokenizer.encode(text, add_bos)
        self.long_started.set()
        deadline = time.monotonic() + LONG_DEADLINE_S
        while True:
            self.tokenizer.encode(text * SLOWER, add_bos)  # one long call, as on a slower machine
            self.num_long_encodes += 1
            if self.short_answered.is_set() or time.monotonic() > deadline:
                self.long_done_at = time.monotonic()
                return self.tokenizer.encode(text, add_bos)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def make_ingress(tokenizer, engine: FakeEngine) -> Ingress:
    """An Ingress replica's state without Serve (its __init__ asks the engine through Ray)."""
    return gateway_fakes.make_ingress(tokenizer, engine, model_name=MODEL, max_model_len=MAX_MODEL_LEN)


def client(ing: Ingress) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=ing.__serve_build_asgi_app__()),
                             base_url="http://ingress")


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(demo_tokenizer_dir)


def long_text(tokenizer: Tokenizer) -> str:
    # CJK characters, one or more tokens each: the slowest text per character the limit lets in.
    limit = max_prompt_chars(MAX_MODEL_LEN, tokenizer.backend.get_vocab(with_added_tokens=True))
    return "".join(chr(0x4E00 + (i * 7919) % 2000) for i in range(limit))


def completion(prompt, model=MODEL, max_tokens=1):
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens}


async def _short_request(http: httpx.AsyncClient) -> None:
    resp = await http.post("/v1/completions", json=completion("Once upon a time"))
    assert resp.status_code == 200, resp.text


def test_a_long_prompt_does_not_hold_up_a_short_one(tokenizer):
    """The replica's event loop runs in a thread of its own; this thread times each short request
    from the moment it hands it over, so a loop held up by tokenizing (on the loop itself, or on a
    thread that does not let go of the GIL) shows in the time."""
    text = long_text(tokenizer)
    gated = GatedTokenizer(tokenizer, text)
    engine = FakeEngine(delay_s=DECODE_STEP_S)
    loop = asyncio.new_event_loop()
    replica = threading.Thread(target=loop.run_forever, daemon=True)
    replica.start()

    def on_loop(coro, timeout_s=2 * LONG_DEADLINE_S):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    def timed_short_request() -> float:
        start = time.monotonic()
        on_loop(_short_request(http))
        return time.monotonic() - start

    async def open_client():
        return client(make_ingress(gated, engine))

    http = on_loop(open_client())
    try:
        alone = [timed_short_request() for _ in range(7)]
        long_request = asyncio.run_coroutine_threadsafe(
            http.post("/v1/completions", json=completion(text)), loop)
        assert gated.long_started.wait(LONG_DEADLINE_S)  # the long prompt is being tokenized now
        beside_long = timed_short_request()
        short_answered_at = time.monotonic()
        gated.short_answered.set()
        long_resp = long_request.result(2 * LONG_DEADLINE_S)
    finally:
        on_loop(http.aclose())
        loop.call_soon_threadsafe(loop.stop)
        replica.join(10)
    usual = statistics.median(alone)
    print(f"\nshort request alone {usual * 1e3:.1f} ms (median of {len(alone)}), while the long "
          f"prompt is tokenized {beside_long * 1e3:.1f} ms ({beside_long / usual:.1f}x); "
          f"{gated.num_long_encodes} encodes of {len(text)} characters meanwhile")
    # Order, not time: the short request was answered while the long prompt was still tokenizing.
    assert gated.long_done_at is not None and short_answered_at <= gated.long_done_at
    assert beside_long <= SLOW_FACTOR * usual, (beside_long, usual)
    # The long prompt was tokenized for real: too many tokens for the context.
    assert long_resp.status_code == 400 and long_resp.json()["error"]["code"] == "context_length_exceeded"
    assert all(len(r.prompt_ids) < 100 for r in engine.requests)


def test_unknown_model_404_names_the_served_model(tokenizer):
    async def scenario():
        async with client(make_ingress(tokenizer, FakeEngine())) as http:
            return (await http.post("/v1/completions", json=completion("hi", model="gpt-4")),
                    await http.get("/v1/models/gpt-4"))

    for resp in asyncio.run(scenario()):
        assert resp.status_code == 404
        error = resp.json()["error"]
        assert error["code"] == "model_not_found" and "gpt-4" in error["message"]
        assert f"serves `{MODEL}`" in error["message"], error


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_body_sent_as_another_content_type_is_told_so(tokenizer, content_type):
    async def scenario():
        async with client(make_ingress(tokenizer, FakeEngine())) as http:
            body = httpx.Request("POST", "http://x", json=completion("hi")).content
            return await http.post("/v1/completions", content=body, headers={"Content-Type": content_type})

    resp = asyncio.run(scenario())
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "invalid_content_type"
    assert "Content-Type: application/json" in error["message"] and content_type in error["message"]


def test_json_content_types_pass():
    for value in (None, "", "application/json", "application/json; charset=utf-8", "application/merge+json"):
        assert errors.is_json_content_type(value), value
    for value in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert not errors.is_json_content_type(value), value


@pytest.mark.parametrize(("draining", "says"), [(True, "draining"), (False, "not ready")])
def test_ready_says_why_it_is_not(tokenizer, monkeypatch, draining, says):
    monkeypatch.setattr(ingress, "is_draining", lambda app_name: draining)
    monkeypatch.setattr(ingress.serve, "get_replica_context", lambda: type("Ctx", (), {"app_name": "a"}))

    async def scenario():
        async with client(make_ingress(tokenizer, FakeEngine(ready=False))) as http:
            return await http.get("/ready")

    resp = asyncio.run(scenario())
    assert resp.status_code == 503
    assert says in resp.json()["error"]["message"]
