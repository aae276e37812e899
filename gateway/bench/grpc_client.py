"""Streams `moe_serve.v1.MoeServe/GenerateStream` over gRPC and times every message.

Every message before the last carries the tokens of one engine step; the last carries the
finish reason and usage. A non-OK status, or a stream that ends without usage, is a failure.
"""

from __future__ import annotations

import time

import grpc

from gateway.bench.config import TargetConfig
from gateway.bench.dataset import BenchRequest
from gateway.bench.request_record import RequestRecord, failed
from gateway.grpc_stubs import moe_serve_pb2 as pb
from gateway.grpc_stubs import moe_serve_pb2_grpc as pb_grpc


class GrpcClient:
    def __init__(self, target: TargetConfig, max_connections: int | None = None) -> None:
        del max_connections  # one HTTP/2 channel multiplexes every stream
        self.target = target
        self.metadata = (("authorization", f"Bearer {target.api_key}"),) if target.api_key else ()
        self.channel = grpc.aio.insecure_channel(target.grpc_address)
        self.stub = pb_grpc.MoeServeStub(self.channel)
        self.model = target.model

    async def start(self) -> None:
        await self.channel.channel_ready()  # fail fast (the runner bounds it) when nothing listens
        if self.model is None:  # for the report and plot only: requests leave `model` empty
            try:
                reply = await self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=10)
                self.model = reply.models[0].id if reply.models else None
            except grpc.aio.AioRpcError:  # e.g. a wrong key: the requests will say so
                pass

    async def close(self) -> None:
        await self.channel.close()

    def message(self, request: BenchRequest) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(max_tokens=request.output_len, temperature=self.target.temperature,
                                     ignore_eos=True)
        if isinstance(request.prompt, str):
            return pb.GenerateRequest(model=self.target.model or "", text=request.prompt, sampling=sampling)
        return pb.GenerateRequest(model=self.target.model or "", token_ids=pb.TokenIds(ids=request.prompt),
                                  sampling=sampling)

    async def send(self, request: BenchRequest, start_s: float) -> RequestRecord:
        t0 = time.perf_counter()
        chunk_times: list[float] = []
        usage = None
        try:
            call = self.stub.GenerateStream(self.message(request), metadata=self.metadata,
                                            timeout=self.target.request_timeout_s)
            async for msg in call:
                if msg.token_ids:
                    chunk_times.append(time.perf_counter() - t0)
                if msg.HasField("usage"):
                    usage = msg.usage
        except grpc.aio.AioRpcError as exc:
            return failed(start_s, time.perf_counter() - t0, f"gRPC {exc.code().name}: {exc.details()}")
        latency = time.perf_counter() - t0
        if usage is None:
            return failed(start_s, latency, "the stream ended without usage")
        return RequestRecord(ok=True, start_s=start_s, latency_s=latency, chunk_times_s=tuple(chunk_times),
                             prompt_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
