"""Every HTTP route and every gRPC method, enumerated from the code, needs the API key but the probes.

HTTP routes come from the FastAPI app's own route table (built by the same
`__serve_build_asgi_app__` the replica runs), so a route added later is covered without
editing this test; gRPC methods come from the service descriptors (moe_serve.v1, the standard
health service, server reflection), and the services the server advertises through reflection
must all be among them. Without the key (or with a wrong one) every request is 401 /
UNAUTHENTICATED, except `/health`, `/ready` and `grpc.health.v1.Health`: probes carry no key.
Serve's own `ray.serve.RayServeAPIService` (Healthz, ListApplications) is answered by Serve's
proxy before any application code runs; it is listed here as what it is.
"""

from __future__ import annotations

import re

import grpc
import httpx
import pytest
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.e2e.conftest import Server
from tests.e2e.serve_grpc import WithMetadata

OPEN_HTTP = {"/health", "/ready"}  # the rule, written down here rather than imported
OPEN_GRPC = {"grpc.health.v1.Health"}
SERVE_BUILTIN = "ray.serve.RayServeAPIService"  # answered by Serve's proxy itself


@pytest.fixture(scope="module")
def channel(keyed_server, grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


def http_routes(server: Server) -> list[tuple[str, str]]:
    """(method, path) of every route of the app the replica builds, path parameters filled in."""
    from gateway.ingress import Ingress, IngressOptions

    ingress = object.__new__(Ingress.func_or_class)  # the attributes the app builder reads, no engine
    ingress.options = IngressOptions(model_dir=server.model_dir, model_name=server.model_name,
                                     api_key=server.api_key)
    app = ingress.__serve_build_asgi_app__()
    routes = []
    for route in app.routes:
        path = re.sub(r"\{[^}]+\}", server.model_name, route.path)
        routes += [(method, path) for method in sorted(route.methods)]
    return routes


def test_the_route_table_is_what_we_think(keyed_server):
    routes = http_routes(keyed_server)
    assert ("POST", "/v1/completions") in routes and ("GET", "/health") in routes
    assert ("GET", "/openapi.json") in routes and ("GET", "/docs") in routes  # the API docs are routes too
    assert len(routes) >= 10


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic c2stZTJl"],
                         ids=["none", "wrong", "basic"])
def test_every_http_route_but_the_probes_needs_the_key(keyed_server, authorization):
    headers = {} if authorization is None else {"authorization": authorization}
    with httpx.Client(base_url=keyed_server.url, timeout=60) as client:
        for method, path in http_routes(keyed_server):
            resp = client.request(method, path, headers=headers)
            if path in OPEN_HTTP:
                assert resp.status_code == 200, (method, path, resp.text)
            else:
                assert resp.status_code == 401, (method, path, resp.status_code)
                assert resp.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    assert resp.json()["error"]["code"] == "invalid_api_key"
        # Routes that do not exist are not told apart from ones that do.
        for path in ("/v1/no-such-route", "/admin", "/"):
            assert client.get(path, headers=headers).status_code == 401


def test_with_the_key_every_route_answers(keyed_server):
    headers = {"authorization": f"Bearer {keyed_server.api_key}"}
    with httpx.Client(base_url=keyed_server.url, timeout=60) as client:
        for method, path in http_routes(keyed_server):
            resp = client.request(method, path, headers=headers)
            # POSTs without a body are 400; everything else answers.
            assert resp.status_code == (400 if method == "POST" else 200), (method, path, resp.text)


def grpc_methods() -> list:
    from gateway.grpc_stubs import moe_serve_pb2 as pb

    services = [*pb.DESCRIPTOR.services_by_name.values(), health_pb2.DESCRIPTOR.services_by_name["Health"],
                reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
    return [method for service in services for method in service.methods]


def call(channel: grpc.Channel, method, metadata) -> grpc.StatusCode:
    """The status of one call of `method` with a default request message."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = GetMessageClass(method.input_type)()
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    stub = kinds[method.client_streaming, method.server_streaming](
        path, request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=GetMessageClass(method.output_type).FromString)
    arg = iter([request]) if method.client_streaming else request
    try:
        result = stub(arg, metadata=metadata, timeout=30)
        if method.server_streaming:
            next(iter(result))  # the first message is enough (Watch never ends by itself)
            result.cancel()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong-key"),)], ids=["none", "wrong"])
def test_every_grpc_method_but_health_needs_the_key(channel, metadata):
    statuses = {f"{m.containing_service.full_name}/{m.name}": call(channel, m, metadata)
                for m in grpc_methods()}
    for name, status in statuses.items():
        service = name.split("/")[0]
        if service in OPEN_GRPC:
            assert status == grpc.StatusCode.OK, (name, status)
        else:
            assert status == grpc.StatusCode.UNAUTHENTICATED, (name, status)


def test_the_key_opens_every_method(channel, keyed_server):
    metadata = (("authorization", f"Bearer {keyed_server.api_key}"),)
    for method in grpc_methods():
        status = call(channel, method, metadata)
        if method.name in ("Generate", "GenerateStream"):
            assert status == grpc.StatusCode.INVALID_ARGUMENT, method.name  # an empty request has no prompt
        else:
            assert status == grpc.StatusCode.OK, (method.full_name, status)


def test_reflection_advertises_only_the_enumerated_services(channel, keyed_server):
    """A service added to the server but not to `grpc_methods` would escape the tests above."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    auth = (("authorization", f"Bearer {keyed_server.api_key}"),)
    keyed = grpc.intercept_channel(channel, WithMetadata(auth))
    served = set(ProtoReflectionDescriptorDatabase(keyed).get_services())
    assert served == {m.containing_service.full_name for m in grpc_methods()}
    assert SERVE_BUILTIN not in served
