"""Fakes of what the ingress talks to, for gateway tests without Ray: a Serve gRPC context, the
engine deployment's handle, and an ingress replica built around them."""

from __future__ import annotations

import asyncio

from gateway.engine_deployment import ModelInfo
from gateway.ingress import Ingress, IngressOptions


class FakeContext:
    """The part of `RayServegRPCContext` the service uses."""

    def __init__(self, metadata=()):
        self._metadata = list(metadata)
        self._code = None
        self._details = None

    def invocation_metadata(self):
        return self._metadata

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details


class _Method:
    def __init__(self, fn):
        self.remote = fn


class FakeStream:
    """A DeploymentResponseGenerator: an async iterator that can be cancelled."""

    def __init__(self, gen, engine):
        self.gen = gen
        self.engine = engine

    def __aiter__(self):
        return self.gen

    def cancel(self):
        self.engine.cancelled += 1


class FakeEngine:
    """A DeploymentHandle to an engine that streams `outputs` for every request (one per step)."""

    def __init__(self, outputs=(), ready=True, error: Exception | None = None):
        self.outputs = list(outputs)
        self.is_ready = ready
        self.error = error
        self.requests, self.aborted = [], []
        self.cancelled = 0
        self.generate = _Method(lambda gen: FakeStream(self._generate(gen), self))
        self.abort = _Method(self.aborted.append)
        self.ready = _Method(self._ready)

    def options(self, stream: bool):
        assert stream
        return self

    async def _generate(self, gen):
        self.requests.append(gen)
        if self.error is not None:
            raise self.error
        for out in self.outputs:
            await asyncio.sleep(0)
            yield out

    async def _ready(self):
        if isinstance(self.is_ready, Exception):
            raise self.is_ready
        return self.is_ready


def make_ingress(tokenizer, engine, *, max_model_len: int, **options) -> Ingress:
    """An Ingress replica without Serve (its __init__ asks the engine through Ray): HTTP through
    its app (`__serve_build_asgi_app__`), gRPC through its methods. `options`: IngressOptions'."""
    ingress = object.__new__(Ingress.func_or_class)
    options = IngressOptions(model_dir="unused", **options)
    ingress.setup(engine, options, tokenizer, ModelInfo(max_model_len=max_model_len,
                                                        vocab_size=tokenizer.vocab_size))
    return ingress
