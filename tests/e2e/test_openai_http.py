"""The OpenAI-compatible HTTP API, driven by the official `openai` client (DESIGN.md §6, §7).

Greedy outputs must equal the single-process engine's on the same checkpoint, run in this
process; errors must arrive as the client's own exception classes with OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from cluster.tokenizer import Tokenizer
from workers.model.sampling_params import SamplingParams

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(openai_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=openai_server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(demo_model_dir)


@pytest.fixture(scope="module")
def reference(demo_model_dir):
    """Greedy output of the single-process engine in this process, each request run alone."""
    engine = build_local_engine(demo_model_dir, EngineConfig(max_num_seqs=4, num_kv_blocks=256))
    loop = asyncio.new_event_loop()  # the engine's step loop lives on one event loop

    def run(prompt_ids: list[int], max_tokens: int) -> dict:
        async def main():
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            return [o async for o in engine.generate("ref", prompt_ids, params)]
        outs = loop.run_until_complete(main())
        return {"token_ids": [t for o in outs for t in o.token_ids], "text": "".join(o.text for o in outs)}

    yield run
    loop.run_until_complete(engine.shutdown())
    loop.close()


def assert_openai_error(exc: openai.APIStatusError, status: int, param: str | None = None,
                        code: str | None = None) -> dict:
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def sse_lines(url: str, payload: dict) -> list[str]:
    with httpx.stream("POST", url, json=payload, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        return [line for line in resp.iter_lines() if line]


# -- the happy paths ----------------------------------------------------------------------------


def test_models_list(client, openai_server):
    models = client.models.list().data
    assert [m.id for m in models] == [openai_server.model_name]
    assert models[0].object == "model" and models[0].max_model_len == 4096
    assert client.models.retrieve(openai_server.model_name).id == openai_server.model_name


def test_health_and_ready(openai_server):
    assert httpx.get(f"{openai_server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{openai_server.url}/ready").json() == {"status": "ready"}


def test_greedy_completion_equals_the_in_process_engine(client, openai_server, tokenizer, reference):
    resp = client.completions.create(model=openai_server.model_name, prompt=PROMPT, max_tokens=20, logprobs=0,
                                     **GREEDY)
    want = reference(tokenizer.encode(PROMPT), 20)
    choice = resp.choices[0]
    assert choice.text == want["text"] and want["text"]
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in want["token_ids"]]
    assert choice.logprobs.tokens == tokens
    assert len(choice.logprobs.token_logprobs) == 20 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert choice.finish_reason == "length" and resp.object == "text_completion"
    n = len(tokenizer.encode(PROMPT))
    usage = resp.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n, 20, n + 20)


def test_token_id_prompts_and_prompt_lists(client, openai_server, tokenizer, reference):
    ids = tokenizer.encode("Once upon a time", add_bos=False)
    want = reference(ids, 8)["text"]
    one = client.completions.create(model=openai_server.model_name, prompt=ids, max_tokens=8, **GREEDY)
    assert one.choices[0].text == want and one.usage.prompt_tokens == len(ids)

    text_want = reference(tokenizer.encode(PROMPT), 8)["text"]
    many = client.completions.create(model=openai_server.model_name, prompt=[ids, ids[:3]], max_tokens=8, n=2,
                                     **GREEDY)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == want
    assert many.choices[2].text == many.choices[3].text == reference(ids[:3], 8)["text"]
    texts = client.completions.create(model=openai_server.model_name, prompt=[PROMPT, PROMPT], max_tokens=8,
                                      **GREEDY)
    assert [c.text for c in texts.choices] == [text_want, text_want]
    assert texts.usage.prompt_tokens == 2 * len(tokenizer.encode(PROMPT))


def test_chat_completion(client, openai_server, tokenizer, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    resp = client.chat.completions.create(model=openai_server.model_name, messages=messages, max_tokens=12,
                                          **GREEDY)
    want = reference(tokenizer.encode_chat(messages), 12)
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content == want["text"]
    assert resp.object == "chat.completion" and resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    assert resp.usage.completion_tokens == 12


def test_streaming_with_usage_joins_to_the_whole_response(client, openai_server):
    kwargs = dict(model=openai_server.model_name, prompt=PROMPT, max_tokens=16, **GREEDY)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"

    chat = list(client.chat.completions.create(
        model=openai_server.model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].usage.completion_tokens == 6 and chat[-2].choices[0].finish_reason == "length"

    lines = sse_lines(f"{openai_server.base_url}/completions",
                      {"model": openai_server.model_name, "prompt": PROMPT, "max_tokens": 4, "stream": True})
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])


def test_stop_strings_end_the_text_before_them(client, openai_server, tokenizer, reference):
    full = reference(tokenizer.encode(PROMPT), 24)["text"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick a stop string from {full!r}"
    resp = client.completions.create(model=openai_server.model_name, prompt=PROMPT, max_tokens=24,
                                     stop=[stop], **GREEDY)
    assert resp.choices[0].text == full[:full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_text(client, openai_server):
    def sample(seed: int) -> str:
        return client.completions.create(model=openai_server.model_name, prompt=PROMPT, max_tokens=16,
                                         temperature=1.0, seed=seed).choices[0].text
    a, b, c = sample(1234), sample(1234), sample(99)
    assert a == b and a != c
    n2 = client.completions.create(model=openai_server.model_name, prompt=PROMPT, max_tokens=16,
                                   temperature=1.0, seed=1234, n=2)
    assert n2.choices[0].text == a and n2.choices[1].text != a  # each choice has its own seed


def test_concurrent_streams_are_independent(openai_server, tokenizer, reference):
    prompts = [f"Request {i} says: {'abc'[i % 3] * (1 + i % 5)}" for i in range(32)]
    wants = [reference(tokenizer.encode(p), 8)["text"] for p in prompts]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=openai_server.base_url, api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            async def one(prompt: str) -> str:
                stream = await aclient.completions.create(model=openai_server.model_name, prompt=prompt,
                                                          max_tokens=8, stream=True, **GREEDY)
                return "".join([c.choices[0].text async for c in stream if c.choices])
            return await asyncio.gather(*[one(p) for p in prompts])

    assert asyncio.run(run_all()) == wants


def wait_until_idle(engine, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while (stats := engine.stats.remote().result()).num_running + stats.num_waiting:
        assert time.monotonic() < deadline, f"the engine still runs the request: {stats}"
        time.sleep(0.1)
    return stats


def test_client_disconnect_frees_the_sequence(openai_server):
    from ray import serve

    engine = serve.get_deployment_handle("EngineDeployment", app_name=openai_server.app_name)
    before = engine.stats.remote().result().num_generated_tokens
    payload = {"model": openai_server.model_name, "prompt": PROMPT, "max_tokens": 3000, "stream": True,
               "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{openai_server.base_url}/completions", json=payload, timeout=60) as resp:
        lines = (line for line in resp.iter_lines() if line)
        for _ in range(3):
            assert next(lines).startswith("data: {")
        assert engine.stats.remote().result().num_running == 1
    assert wait_until_idle(engine).num_generated_tokens - before < 3000

    # A non-streaming request whose client gives up is aborted too.
    before = engine.stats.remote().result().num_generated_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{openai_server.base_url}/completions", json={**payload, "stream": False}, timeout=2)
    assert wait_until_idle(engine).num_generated_tokens - before < 3000


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"n": True}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 9}, "n"),
    ({"top_k": -2}, "top_k"),
    ({"seed": 2**70}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [1, 10**7]}, "prompt"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logprobs": 3}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_bad_fields_are_400(client, openai_server, fields, param):
    body = {"prompt": PROMPT, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=openai_server.model_name, prompt=body.pop("prompt"),
                                  max_tokens=body.pop("max_tokens"), extra_body=body)
    error = assert_openai_error(err.value, 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_bad_chat_messages_are_400(client, openai_server):
    for messages, param in [([], "messages"), ([{"role": "user"}], "messages"),
                            ([{"role": "assistant", "content": "hi"}], "messages")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=openai_server.model_name, messages=messages, max_tokens=4)
        assert_openai_error(err.value, 400, param=param)


def test_malformed_json_is_400_not_422(openai_server):
    resp = httpx.post(f"{openai_server.base_url}/completions", content=b"{not json",
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_context_length_is_400(client, openai_server):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=openai_server.model_name, prompt=PROMPT, max_tokens=5000,
                                      stream=stream)
        error = assert_openai_error(err.value, 400, param="prompt", code="context_length_exceeded")
        assert "maximum context length is 4096 tokens" in error["message"]


def test_unknown_model_and_route_are_404(client, openai_server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    assert_openai_error(err.value, 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    resp = httpx.get(f"{openai_server.base_url}/no-such-route")
    assert resp.status_code == 404 and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_oversized_body_is_413(client, openai_server):
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=openai_server.model_name, prompt="x" * (1 << 20), max_tokens=4)
    assert_openai_error(err.value, 413, code="request_too_large")


def test_api_key(keyed_server):
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=keyed_server.base_url, api_key=key, max_retries=0, timeout=120)

    with pytest.raises(openai.AuthenticationError) as err:
        client("wrong-key").models.list()
    error = assert_openai_error(err.value, 401, code="invalid_api_key")
    assert keyed_server.api_key not in json.dumps(error)
    missing = httpx.get(f"{keyed_server.base_url}/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client("wrong-key").completions.create(model=keyed_server.model_name, prompt=PROMPT, max_tokens=2)
    good = client(keyed_server.api_key)
    assert [m.id for m in good.models.list().data] == [keyed_server.model_name]
    resp = good.completions.create(model=keyed_server.model_name, prompt=PROMPT, max_tokens=2)
    assert resp.usage.completion_tokens == 2
    # Probes carry no key.
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200
    assert httpx.get(f"{keyed_server.url}/ready").status_code == 200


def test_greedy_completion_equals_transformers_generate(client, openai_server, tokenizer, demo_model_dir):
    """The oracle nobody here wrote: HF generate on the same checkpoint, through the whole gateway."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    for text in ("The river runs", "Seven plus five is"):
        prompt_ids = tokenizer.encode(text)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
        got = client.completions.create(model=openai_server.model_name, prompt=prompt_ids, max_tokens=12,
                                        temperature=0.0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == tokenizer.decode(ref)
        assert got.usage.completion_tokens == 12
