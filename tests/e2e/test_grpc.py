"""gRPC through Ray Serve's gRPC proxy, with a real grpcio client (DESIGN.md §6, §7).

`moe_serve.v1.MoeServe` unary and streaming, ListModels, the standard grpc.health.v1 service
(with grpcio-health-checking's own stub), status codes, and cancellation freeing the sequence.
Greedy text must equal the single-process engine's, run here in the test process.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from cluster.tokenizer import Tokenizer
from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.grpc_stubs import moe_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import Server
from tests.e2e.serve_grpc import WithMetadata
from workers.model.sampling_params import SamplingParams
from workers.weights.config import ModelConfig

MODEL_NAME = "demo"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(keyed_server) -> Server:
    """The app with an API key (single-process engine); the only app, as in `moe-serve serve`, so
    calls need no `application` metadata."""
    return keyed_server


@pytest.fixture(scope="module")
def channel(server, grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.MoeServeStub(channel)


@pytest.fixture(scope="module")
def auth(server):
    return (("authorization", f"Bearer {server.api_key}"),)


@pytest.fixture(scope="module")
def reference(server):
    """Greedy generation by the single-process engine in this process: the expected text."""
    engine = build_local_engine(server.model_dir, EngineConfig(max_num_seqs=4, num_kv_blocks=256))
    tok = Tokenizer.from_dir(server.model_dir)

    def run(prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        async def main():
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            outs = [o async for o in engine.generate("ref", prompt_ids, params)]
            return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)
        return asyncio.run(main())

    return tok, run


def greedy(text: str = PROMPT, max_tokens: int = 24, **sampling) -> pb.GenerateRequest:
    sampling = {"temperature": 0, "ignore_eos": True, **sampling}
    return pb.GenerateRequest(text=text, sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling))


def test_generate_is_the_engines_greedy_text(stub, auth, reference):
    tok, run = reference
    resp = stub.Generate(greedy(logprobs=True), metadata=auth, timeout=60)
    ids, text = run(tok.encode(PROMPT), 24)
    assert list(resp.token_ids) == ids and resp.text == text and text
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(resp.logprobs) == 24 and all(lp <= 0 for lp in resp.logprobs)
    n = len(tok.encode(PROMPT))
    usage = resp.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n, 24, n + 24)
    assert resp.model == MODEL_NAME and resp.request_id


def test_token_id_prompts_are_used_as_given(stub, auth, reference):
    tok, run = reference
    prompt = tok.encode("Once upon a time", add_bos=False)
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                             sampling=pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    resp = stub.Generate(req, metadata=auth, timeout=60)
    assert (list(resp.token_ids), resp.text) == run(prompt, 12)
    assert resp.usage.prompt_tokens == len(prompt)


def test_stream_deltas_join_to_the_unary_response(stub, auth):
    unary = stub.Generate(greedy(), metadata=auth, timeout=60)
    msgs = list(stub.GenerateStream(greedy(), metadata=auth, timeout=60))
    assert len(msgs) > 1
    assert [t for m in msgs for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in msgs) == unary.text
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not m.HasField("usage") for m in msgs[:-1])
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and msgs[-1].usage.completion_tokens == 24
    assert len({m.request_id for m in msgs}) == 1


def test_list_models(stub, auth, server):
    models = stub.ListModels(pb.ListModelsRequest(), metadata=auth, timeout=30).models
    assert [m.id for m in models] == [server.model_name] == [MODEL_NAME]
    assert models[0].max_model_len == ModelConfig.from_dir(server.model_dir).max_position_embeddings


def test_standard_health_service_says_serving_without_a_key(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "moe_serve.v1.MoeServe"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_reflection_describes_the_service_for_grpcurl(channel, auth):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    # Reflection is behind the key like the service itself (grpcurl: -H 'authorization: Bearer ...').
    db = ProtoReflectionDescriptorDatabase(grpc.intercept_channel(channel, WithMetadata(auth)))
    assert {"moe_serve.v1.MoeServe", "grpc.health.v1.Health"} <= set(db.get_services())
    service = DescriptorPool(db).FindServiceByName("moe_serve.v1.MoeServe")
    assert [m.name for m in service.methods] == ["Generate", "GenerateStream", "ListModels"]


@pytest.mark.parametrize("req", [
    greedy(temperature=-1),
    pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=0)),
    pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=0)),
    pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4)),  # no prompt
    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**8])),
    greedy(max_tokens=10**6),  # beyond the context length
], ids=["temperature", "top_p", "max_tokens", "no-prompt", "token-id", "context"])
def test_bad_params_are_invalid_argument(stub, auth, req):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(req, metadata=auth, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(req, metadata=auth, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-key"),)], ids=["missing", "wrong"])
def test_without_the_api_key_calls_are_unauthenticated(stub, server, metadata):
    for call in (lambda: stub.Generate(greedy(), metadata=metadata, timeout=30),
                 lambda: list(stub.GenerateStream(greedy(), metadata=metadata, timeout=30)),
                 lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.api_key not in (err.value.details() or "")


def test_an_unknown_model_is_not_found(stub, auth):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(model="gpt-4", text="hi"), metadata=auth, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancelling_a_stream_frees_its_sequence(stub, auth, server):
    from ray import serve

    engine = serve.get_deployment_handle("EngineDeployment", server.app_name)
    generated_before = engine.stats.remote().result().num_generated_tokens
    stream = stub.GenerateStream(greedy(max_tokens=2000), metadata=auth, timeout=120)
    next(stream), next(stream)
    assert engine.stats.remote().result().num_running == 1
    stream.cancel()
    deadline = time.monotonic() + 30
    while (stats := engine.stats.remote().result()).num_running + stats.num_waiting:
        assert time.monotonic() < deadline, "the engine still runs the cancelled request"
        time.sleep(0.1)
    assert stats.num_generated_tokens - generated_before < 2000


def test_concurrent_cancelled_streams_all_free_their_sequences(stub, auth, server):
    """Cancels that land while the proxy writes a message, which concurrent streams make common,
    free their sequences too (gateway/grpc_cancel.py): none runs on towards its 2000 tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    engine = serve.get_deployment_handle("EngineDeployment", server.app_name)
    generated_before = engine.stats.remote().result().num_generated_tokens
    num_streams = 16

    def cancel_after_a_few_messages(_: int) -> None:
        stream = stub.GenerateStream(greedy(max_tokens=2000), metadata=auth, timeout=120)
        next(stream), next(stream), next(stream)
        stream.cancel()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(cancel_after_a_few_messages, range(num_streams)))
    deadline = time.monotonic() + 60
    while (stats := engine.stats.remote().result()).num_running + stats.num_waiting:
        assert time.monotonic() < deadline, f"{stats.num_running} cancelled streams still run"
        time.sleep(0.1)
    assert stats.num_kv_blocks_used == 0
    # A few tokens each before the cancel lands; one stream left running would add up to 2000.
    assert stats.num_generated_tokens - generated_before < num_streams * 40


def test_http_and_grpc_give_the_same_greedy_text(stub, auth, server):
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    http = httpx.post(f"{server.base_url}/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {server.api_key}"})
    assert http.status_code == 200, http.text
    grpc_resp = stub.Generate(greedy(max_tokens=24), metadata=auth, timeout=60)
    assert grpc_resp.text == http.json()["choices"][0]["text"] and grpc_resp.text
    assert grpc_resp.usage.completion_tokens == http.json()["usage"]["completion_tokens"]
