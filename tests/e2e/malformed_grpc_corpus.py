"""A deterministic corpus of malformed moe_serve.v1 gRPC messages, and the status each must get.

`grpc_cases(vocab_size)`: bytes that are no protobuf at all, messages with out-of-range field
values, oversized ones, unknown models, methods and services. Like the HTTP corpus
(malformed_corpus.py), every case is refused before the engine is called.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.request_limits import DEFAULT_MAX_BODY_BYTES as MAX_BODY_BYTES
from gateway.request_limits import MAX_INT32, MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS

GENERATE = "/moe_serve.v1.MoeServe/Generate"
GENERATE_STREAM = "/moe_serve.v1.MoeServe/GenerateStream"
LIST_MODELS = "/moe_serve.v1.MoeServe/ListModels"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"  # client-streaming too


@dataclass(frozen=True)
class GrpcCase:
    name: str
    method: str  # "/package.Service/Method"
    body: bytes  # the request message as sent: raw bytes, valid protobuf or not
    status: str  # grpc.StatusCode's name, e.g. "INVALID_ARGUMENT"


def grpc_cases(vocab_size: int) -> list[GrpcCase]:
    """Malformed moe_serve.v1 requests: bytes that are no protobuf, wrong field values, oversized."""
    from gateway.grpc_stubs import moe_serve_pb2 as pb

    def generate(**sampling) -> pb.GenerateRequest:
        return pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(**{"max_tokens": 2, **sampling}))

    not_protobuf = [
        b"\xff", b"\xff\xff\xff\xff", b"\x08", b"\x12", b"\x12\x10abc",  # truncated varint / length
        b"\x12\x02\xff\xfe",  # text = invalid UTF-8
        b"\x0a\x03\xc3\x28x",  # model = invalid UTF-8
        b"\x1a\x05\x0a\x03\x80\x80\x80",  # token_ids.ids: a varint that never ends
        b"\x22\x03\x3a\x01\xff",  # sampling.stop = invalid UTF-8
        b"\x07", b"\x00\x00", b"\x0f\x00",  # wire types 7, field 0, an end-group without a start
        b"\x12\xff\xff\xff\xff\x0f", b"{\"text\": \"json, not protobuf\"}", b"\x80" * 64,
    ]
    bad_values = {
        "temperature-negative": generate(temperature=-1),
        "temperature-nan": generate(temperature=float("nan")),
        "temperature-inf": generate(temperature=float("inf")), "top-p-zero": generate(top_p=0),
        "top-p-above-one": generate(top_p=1.5), "top-k": generate(top_k=-7), "min-p": generate(min_p=2),
        "max-tokens-zero": generate(max_tokens=0), "max-tokens-huge": generate(max_tokens=2**32 - 1),
        "stop-empty": generate(stop=[""]),
        "stop-count": generate(stop=[f"s{i}" for i in range(MAX_STOP + 1)]),
        "stop-chars": generate(stop=["x" * (MAX_STOP_CHARS + 1)]),
        "stop-token-ids-negative": generate(stop_token_ids=[-1]),
        "stop-token-ids-count": generate(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))),
        "no-prompt": pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=2)),
        "empty-token-ids": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])),
        "oov-token-id": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, vocab_size])),
        "negative-token-id": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])),
        "max-token-id": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[MAX_INT32])),
        "context": pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 5000)),
        "oversized-text": pb.GenerateRequest(text="z" * (MAX_BODY_BYTES + 1)),
        "long-text": pb.GenerateRequest(text="word " * 180_000),  # cannot fit: refused before tokenizing
    }
    cases = []
    for method in (GENERATE, GENERATE_STREAM):
        short = method.rsplit("/", 1)[1]
        cases += [GrpcCase(f"{short}/not-protobuf-{i}", method, raw, "INVALID_ARGUMENT")
                  for i, raw in enumerate(not_protobuf)]
        cases += [GrpcCase(f"{short}/{name}", method, msg.SerializeToString(), "INVALID_ARGUMENT")
                  for name, msg in bad_values.items()]
        cases += [GrpcCase(f"{short}/unknown-model", method, pb.GenerateRequest(model="gpt-4", text="x")
                           .SerializeToString(), "NOT_FOUND"),
                  GrpcCase(f"{short}/long-model", method, pb.GenerateRequest(model="M" * 20_000, text="x")
                           .SerializeToString(), "NOT_FOUND")]
    cases += [GrpcCase(f"ListModels/not-protobuf-{i}", LIST_MODELS, raw, "INVALID_ARGUMENT")
              for i, raw in enumerate(not_protobuf[:5])]  # broken at the wire level: no message parses
    cases += [GrpcCase(f"ServerReflectionInfo/not-protobuf-{i}", REFLECTION, raw, "INVALID_ARGUMENT")
              for i, raw in enumerate(not_protobuf[:5])]
    cases += [GrpcCase("unknown-method", "/moe_serve.v1.MoeServe/Nope", b"", "UNIMPLEMENTED"),
              GrpcCase("unknown-service", "/moe_serve.v2.MoeServe/Generate", b"", "UNIMPLEMENTED")]
    return cases
