"""`moe-serve serve`'s pure parts, without Ray: the gRPC bind hook (on a real grpcio server), the
listening-socket check, Ray's init arguments for --metrics-port, and the banner."""

from __future__ import annotations

import asyncio
import ipaddress
import shlex
import socket

import grpc
import pytest

from gateway import grpc_bind
from gateway.app import ServeOptions
from gateway.autoscaling import AutoscalingOptions
from gateway.cli import build_parser
from gateway.listening_sockets import beyond_host, listening_addresses, parse_proc_net_tcp
from gateway.serve_banner import SAMPLE_PROMPT, MetricsEndpoint, banner, metrics_lines
from gateway.serve_command import DEFAULT_METRICS_PORT, metrics_endpoints, ray_init_kwargs, run_serve

ip = ipaddress.ip_address


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options(tmp_path, **fields) -> ServeOptions:
    (tmp_path / "config.json").write_text("{}")
    return ServeOptions(model_dir=str(tmp_path), model_name="demo", **fields)


# -- gRPC bound to --host ------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "address"), [
    ("127.0.0.1", "127.0.0.1:9000"), ("0.0.0.0", "0.0.0.0:9000"), ("::1", "[::1]:9000"),
    ("[::1]", "[::1]:9000"), ("localhost", "localhost:9000"),
])
def test_grpc_listen_address(host, address):
    assert grpc_bind.grpc_listen_address(host, 9000) == address


def test_hook_environment_chains_a_callback_the_user_had():
    env = grpc_bind.hook_environment("127.0.0.1", {})
    assert env == {grpc_bind.HOOK_ENV: grpc_bind.HOOK, grpc_bind.HOST_ENV: "127.0.0.1"}
    env = grpc_bind.hook_environment("::1", {grpc_bind.HOOK_ENV: "mine:callback"})
    assert env[grpc_bind.CHAINED_HOOK_ENV] == "mine:callback" and env[grpc_bind.HOOK_ENV] == grpc_bind.HOOK
    # Set again by our own process (a second run): nothing to chain.
    again = grpc_bind.hook_environment("x", {grpc_bind.HOOK_ENV: grpc_bind.HOOK})
    assert grpc_bind.CHAINED_HOOK_ENV not in again


def test_the_hook_names_an_importable_function():
    module, name = grpc_bind.HOOK.split(":")
    assert module == grpc_bind.__name__ and callable(getattr(grpc_bind, name))


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", {"127.0.0.1"}),
    ("0.0.0.0", {"0.0.0.0", "::"}),  # gRPC makes a wildcard IPv4 address its dual-stack wildcard
])
def test_the_proxy_callback_makes_serve_bind_grpc_to_the_host(monkeypatch, host, expected):
    """What Serve's proxy does, on a real grpcio server: `start_grpc_server` adds "[::]:PORT"
    through `default_impl.add_grpc_address`, which the callback has replaced."""
    from ray.serve._private import default_impl

    monkeypatch.setattr(default_impl, "add_grpc_address", default_impl.add_grpc_address)  # restored after
    monkeypatch.setenv(grpc_bind.HOST_ENV, host)
    monkeypatch.delenv(grpc_bind.CHAINED_HOOK_ENV, raising=False)
    assert grpc_bind.bind_grpc_to_host() == []  # no HTTP middlewares
    port = free_port()

    async def listening():
        server = grpc.aio.server()
        default_impl.add_grpc_address(server, f"[::]:{port}")  # as ray/serve/_private/grpc_util.py does
        try:
            return listening_addresses(port)
        finally:
            await server.stop(None)

    found = asyncio.run(listening())
    assert len(found) == 1 and str(found[0]) in expected, found


def test_without_the_hook_serve_listens_on_every_interface():
    """The reason for all this: Serve's own add_grpc_address with its "[::]" address."""
    from ray.serve._private import default_impl

    port = free_port()

    async def listening():
        server = grpc.aio.server()
        default_impl.add_grpc_address(server, f"[::]:{port}")
        try:
            return listening_addresses(port)
        finally:
            await server.stop(None)

    found = asyncio.run(listening())
    assert found and beyond_host("127.0.0.1", found) == found


# -- the listener check --------------------------------------------------------------------------

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:2328 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:2328 00000000000000000000000000000000:0000 0A
   1: 0000000000000000FFFF00000100007F:2329 00000000000000000000000000000000:0000 0A
   2: 00000000000000000000000001000000:232A 00000000000000000000000000000000:0000 0A
"""


def test_parse_proc_net_tcp():
    assert parse_proc_net_tcp(PROC_NET_TCP, "little") == [(ip("127.0.0.1"), 9000), (ip("0.0.0.0"), 8080)]
    assert parse_proc_net_tcp(PROC_NET_TCP6, "little") == [
        (ip("::"), 9000), (ip("127.0.0.1"), 9001), (ip("::1"), 9002)]  # a v4-mapped socket is its v4 address


@pytest.mark.parametrize(("host", "listening", "beyond"), [
    ("127.0.0.1", ["127.0.0.1"], []),
    ("127.0.0.1", ["::"], ["::"]),
    ("127.0.0.1", ["0.0.0.0", "127.0.0.1"], ["0.0.0.0"]),
    ("localhost", ["127.0.0.1"], []),
    ("198.18.0.1", ["198.18.0.1"], []),
    ("198.18.0.1", ["127.0.0.1"], ["127.0.0.1"]),
    ("0.0.0.0", ["::", "0.0.0.0"], []),
    ("::", ["::"], []),
])
def test_beyond_host(host, listening, beyond):
    assert beyond_host(host, [ip(a) for a in listening]) == [ip(a) for a in beyond]


def test_listening_addresses_sees_a_socket_here():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listening_addresses(port) == [ip("127.0.0.1")]
    assert listening_addresses(port) == []


# -- Ray's metrics port --------------------------------------------------------------------------


def test_ray_init_kwargs(tmp_path):
    opts = options(tmp_path)
    own = ray_init_kwargs(opts, None, None, {"A": "1"})
    assert own["address"] == "local" and own["_metrics_export_port"] == DEFAULT_METRICS_PORT == 8080
    assert ray_init_kwargs(opts, None, 9100, {})["_metrics_export_port"] == 9100
    none = ray_init_kwargs(opts, None, 0, {})
    assert "_metrics_export_port" not in none
    assert none["_system_config"] == {"enable_metrics_collection": False}
    joined = ray_init_kwargs(opts, "auto", None, {"A": "1"})
    assert joined["address"] == "auto" and joined["runtime_env"] == {"env_vars": {"A": "1"}}
    assert "_metrics_export_port" not in joined


def test_metrics_port_flag():
    parser = build_parser()
    assert parser.parse_args(["serve"]).metrics_port is None  # 8080 unless joining a cluster
    assert parser.parse_args(["serve", "--metrics-port", "0"]).metrics_port == 0


def test_metrics_port_is_refused_when_joining(tmp_path, capsys):
    assert run_serve(options(tmp_path), address="auto", metrics_port=9100) == 2
    assert "--metrics-port" in capsys.readouterr().err


def test_a_busy_metrics_port_is_refused_before_ray_starts(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        assert run_serve(options(tmp_path), metrics_port=port) == 2
    assert f"metrics port {port} is in use" in capsys.readouterr().err


NODES = [
    {"Alive": True, "NodeManagerAddress": "10.0.0.2", "MetricsExportPort": 8080},
    {"Alive": True, "NodeManagerAddress": "10.0.0.1", "MetricsExportPort": 8080},
    {"Alive": False, "NodeManagerAddress": "10.0.0.3", "MetricsExportPort": 8080},
    {"Alive": True, "NodeManagerAddress": "10.0.0.4", "MetricsExportPort": -1},  # collection off
]


def test_metrics_endpoints_and_lines():
    joined = metrics_endpoints(NODES, "127.0.0.1", joined=True)
    assert [e.url for e in joined] == ["http://10.0.0.1:8080/metrics", "http://10.0.0.2:8080/metrics"]
    lines = metrics_lines(joined, joined=True, metrics_port=None)
    assert "2 nodes" in lines[0] and lines[1].strip() == "http://10.0.0.1:8080/metrics"
    own = metrics_endpoints(NODES[:1], "127.0.0.1", joined=False)
    assert metrics_lines(own, joined=False, metrics_port=8080) == ["  metrics     http://127.0.0.1:8080/metrics"]
    assert metrics_lines([], joined=False, metrics_port=0) == ["  metrics     off (--metrics-port 0)"]
    many = [MetricsEndpoint(f"10.0.1.{i}", 8080) for i in range(12)]
    assert "4 more" in metrics_lines(many, joined=True, metrics_port=None)[-1]


def test_a_wildcard_host_is_reached_at_loopback():
    assert MetricsEndpoint("0.0.0.0", 8080).url == "http://127.0.0.1:8080/metrics"
    assert MetricsEndpoint("::1", 8080).url == "http://[::1]:8080/metrics"


# -- the banner ----------------------------------------------------------------------------------


def curl_argv(text: str) -> list[str]:
    """The banner's curl command as the shell would split it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
    return shlex.split(" ".join(line.rstrip("\\") for line in lines[start:start + 2]))


def test_banner_curl_carries_the_key_as_it_was_given(tmp_path):
    keyed = options(tmp_path, api_key="sk-abc")
    from_env = curl_argv(banner(keyed, grpc=True, key_from_env=True))
    assert "Authorization: Bearer $MOE_SERVE_API_KEY" in from_env  # expanded by the user's shell
    from_flag = curl_argv(banner(keyed, grpc=True, key_from_env=False))
    assert "Authorization: Bearer sk-abc" in from_flag
    open_ = curl_argv(banner(options(tmp_path), grpc=True, key_from_env=False))
    assert not any("Authorization" in a for a in open_)
    assert "Content-Type: application/json" in open_


def test_banner_sample_asks_nothing_of_the_model(tmp_path):
    argv = curl_argv(banner(options(tmp_path), grpc=False, key_from_env=False))
    body = argv[argv.index("-d") + 1]
    assert SAMPLE_PROMPT in body and "?" not in SAMPLE_PROMPT and "capital" not in body
    assert argv[1] == "http://127.0.0.1:8000/v1/completions"


def test_banner_layout_metrics_and_demo_note(tmp_path):
    text = banner(options(tmp_path, num_attention_workers=2, num_expert_workers=4), grpc=True,
                  key_from_env=False, metrics=["  metrics     http://127.0.0.1:8080/metrics"])
    layout = next(line for line in text.splitlines() if line.strip().startswith("layout"))
    assert "2 attention + 4 expert workers" in layout and "device auto" in layout and "dtype auto" in layout
    assert "metrics     http://127.0.0.1:8080/metrics" in text
    assert "gRPC        127.0.0.1:9000" in text and "random" not in text
    (tmp_path / "moe_serve_demo.json").write_text("{}")
    assert "random weights" in banner(options(tmp_path), grpc=False, key_from_env=False)
    single = banner(options(tmp_path, num_expert_workers=0), grpc=False, key_from_env=False)
    assert "no expert workers" in single


def test_banner_on_every_interface(tmp_path):
    text = banner(options(tmp_path, host="0.0.0.0"), grpc=True, key_from_env=False)
    assert "http://127.0.0.1:8000/v1" in text and "every interface" in text


def test_banner_autoscaling(tmp_path):
    text = banner(options(tmp_path, autoscaling=AutoscalingOptions(max_replicas=3)), grpc=False,
                  key_from_env=False)
    assert "autoscaling 1..3 model groups" in text
