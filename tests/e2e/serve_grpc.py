"""Helpers for test modules that speak gRPC and watch the engine: metadata on reflection calls,
the engine deployment's handle, and waiting for an app's engine to go idle."""

from __future__ import annotations

import time

import grpc


class WithMetadata(grpc.StreamStreamClientInterceptor):
    """Adds metadata to stream-stream calls: the reflection client has no parameter for it."""

    def __init__(self, metadata) -> None:
        self.metadata = tuple(metadata)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        details = details._replace(metadata=tuple(details.metadata or ()) + self.metadata)
        return continuation(details, request_iterator)


def engine_handle(app_name: str):
    from ray import serve

    return serve.get_deployment_handle("EngineDeployment", app_name=app_name)


def wait_until_idle(app_name: str, timeout_s: float = 60):
    """Poll the app's engine until no sequence runs or waits and no KV block is used; its stats."""
    engine = engine_handle(app_name)
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine.stats.remote().result()
        if stats.num_running + stats.num_waiting + stats.num_kv_blocks_used == 0:
            return stats
        assert time.monotonic() < deadline, f"the engine still holds sequences: {stats}"
        time.sleep(0.1)
