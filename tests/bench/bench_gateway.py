"""Added latency of the gateway: a 1-token completion through HTTP and gRPC vs the engine in-process.

Run from the repository root: `python -m tests.bench.bench_gateway` (`--quick` for a smoke run,
`--engines single 1+2` to add the expert-parallel group). Not a test: nothing here asserts a time.

One Ray cluster on loopback and one Serve instance (HTTP and gRPC proxies) hold two kinds of
application, each with its own route prefix and gRPC `application` name:

    gateway app    what `moe-serve serve` runs (`gateway.app.build_app`), on the demo model, per
                   `--engines` entry: `single` (ServeOptions(num_expert_workers=0): the whole model
                   inside the engine replica) and/or `1+2` (1 attention + 2 expert workers)
    no-op app      one FastAPI deployment: GET / and gRPC ListModels return at once, no engine

Systems, one request at a time, the same greedy 1-token completion (`max_tokens` 1,
`temperature` 0, `ignore_eos`) of one text prompt:

    in-process      engine.generate in this process (build_local_engine, the replica's EngineConfig),
                    on the ids the ingress's tokenizer makes of the prompt
    HTTP (E)        POST /v1/completions through Serve's HTTP proxy (httpx, one keep-alive client)
    gRPC (E)        MoeServe/Generate through Serve's gRPC proxy (grpc.aio, one channel)
    no-op HTTP      GET on the no-op app: proxy → replica → proxy, nothing else
    no-op gRPC      ListModels on the no-op app: the same through the gRPC proxy

Each round runs every system once, in an order rotated per round, so drift and a busy neighbour
hit all alike; a few unrecorded rounds warm every path first. Latency is the client's wall time
of one call. The gateway's cost is then

    HTTP − in-process              everything the gateway adds around the engine's own work
    HTTP − no-op HTTP − in-process what our ingress and the engine hop add beyond Serve's proxy
                                   (tokenize, validate, the handle call, `@serve.batch`'s wait, JSON)

and likewise for gRPC. For `1+2` the in-process side is still the single-process engine, so its
differences also hold the group's own step cost (Ray calls, all-to-alls: see bench_distributed).
Ratios and differences are of the systems' percentiles (a median minus a median) and, for
differences, also the median over rounds of the difference within each round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cluster.tokenizer import Tokenizer
from gateway.app import ServeOptions
from gateway.demo_checkpoint import write_demo_checkpoint
from gateway.engine_deployment import DEFAULT_BATCH_WAIT_TIMEOUT_S
from tests.bench.bench_util import Samples, print_table
from tests.e2e.conftest import Server, free_port, run_app

PROMPT = "The capital of France is"
MODEL_NAME = "demo"
IN_PROCESS, NOOP_HTTP, NOOP_GRPC = "in-process", "no-op HTTP", "no-op gRPC"
NOOP_APP, NOOP_PREFIX = "bench-noop", "/noop"
WARM_UP_ROUNDS = 5
# The engine groups a gateway app can run, by `--engines` name; the rest of ServeOptions is shared.
ENGINES: dict[str, dict] = {
    "single": dict(num_expert_workers=0),
    "1+2": dict(num_attention_workers=1, num_expert_workers=2),
}

Probe = Callable[[], Awaitable[str]]  # one request; returns the completion's text ("" for no-ops)


def percentile(s: Samples, q: int) -> float:
    return statistics.quantiles(s.values, n=100, method="inclusive")[q - 1]


def serve_options(model_dir: Path, engine: str) -> ServeOptions:
    return ServeOptions(model_dir=str(model_dir), model_name=MODEL_NAME, num_cpus_per_worker=0.25,
                        max_num_seqs=8, num_kv_blocks=256, **ENGINES[engine])


# -- the cluster --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    http_url: str
    grpc_target: str


def start_serve() -> Cluster:
    """Ray on loopback and Serve with our gRPC services registered, as tests/e2e/test_grpc.py does."""
    import ray
    from ray import serve

    from gateway.grpc_stubs import servicer_functions

    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": grpc_port, "grpc_servicer_functions": servicer_functions()})
    return Cluster(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")


def noop_app():
    """A separate app whose ingress does nothing: what Serve's proxies cost on their own."""
    from fastapi import FastAPI
    from ray import serve

    from gateway.grpc_stubs import moe_serve_pb2 as pb

    app = FastAPI()

    @serve.deployment(name="NoOp", ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(app)
    class NoOp:
        @app.get("/")
        async def noop(self) -> dict:
            return {}

        async def ListModels(self, request):  # the gRPC method's name: the proxy calls it so
            return pb.ListModelsResponse()

    return NoOp.bind()


def deploy(cluster: Cluster, model_dir: Path, engines: list[str]) -> dict[str, Server]:
    from ray import serve

    serve.run(noop_app(), name=NOOP_APP, route_prefix=NOOP_PREFIX, blocking=False)
    return {e: run_app(cluster.http_url, serve_options(model_dir, e), f"bench-gw-{e}", f"/gw-{e}")
            for e in engines}


def replica_torch_threads(app_name: str) -> int:
    """torch's intra-op threads inside the app's engine replica (Ray sets OMP_NUM_THREADS per actor)."""
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if actor["namespace"] == "serve" and app_name in name and "EngineDeployment" in name:
            handle = ray.get_actor(name, namespace="serve")
            return ray.get(handle.__ray_call__.remote(lambda _replica: torch.get_num_threads()))
    raise LookupError(f"no engine replica of {app_name}")


# -- systems ------------------------------------------------------------------------------


def in_process_probe(engine, prompt_ids: list[int]) -> Probe:
    from workers.model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    count = 0

    async def probe() -> str:
        nonlocal count
        count += 1
        return "".join([o.text async for o in engine.generate(f"bench-{count}", prompt_ids, params)])

    return probe


def http_probe(client, server: Server) -> Probe:
    body = {"model": server.model_name, "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
            "ignore_eos": True}

    async def probe() -> str:
        resp = await client.post(f"{server.base_url}/completions", json=body)
        resp.raise_for_status()
        return resp.json()["choices"][0]["text"]

    return probe


def grpc_probe(stub, server: Server) -> Probe:
    from gateway.grpc_stubs import moe_serve_pb2 as pb

    request = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=1, temperature=0,
                                                                        ignore_eos=True))
    metadata = (("application", server.app_name),)

    async def probe() -> str:
        return (await stub.Generate(request, metadata=metadata, timeout=60)).text

    return probe


def noop_probes(client, stub, cluster: Cluster) -> dict[str, Probe]:
    from gateway.grpc_stubs import moe_serve_pb2 as pb

    metadata = (("application", NOOP_APP),)

    async def http() -> str:
        (await client.get(f"{cluster.http_url}{NOOP_PREFIX}/")).raise_for_status()
        return ""

    async def grpc_noop() -> str:
        await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=60)
        return ""

    return {NOOP_HTTP: http, NOOP_GRPC: grpc_noop}


# -- measurement --------------------------------------------------------------------------


async def measure(probes: dict[str, Probe], rounds: int) -> tuple[dict[str, Samples], dict[str, str]]:
    """Interleaved rounds; returns each system's latencies (s) and the text of its last call."""
    order = list(probes)
    for _ in range(WARM_UP_ROUNDS):  # connections, first-call caches, the replicas' lazy set-up
        for probe in probes.values():
            await probe()
    samples = {name: Samples() for name in order}
    texts: dict[str, str] = {}
    for i in tqdm(range(rounds), desc="rounds", unit="round"):
        shift = i % len(order)
        for name in order[shift:] + order[:shift]:
            t0 = time.perf_counter()
            texts[name] = await probes[name]()
            samples[name].add(time.perf_counter() - t0)
    return samples, texts


async def run_all(cluster: Cluster, servers: dict[str, Server], model_dir: Path,
                  rounds: int) -> tuple[dict[str, Samples], dict[str, str]]:
    import grpc
    import httpx

    from cluster.local_engine import build_local_engine
    from gateway.grpc_stubs import moe_serve_pb2_grpc as pb_grpc

    any_server = next(iter(servers.values()))
    options = serve_options(model_dir, "single")
    engine = build_local_engine(model_dir, options.engine_options().engine)
    prompt_ids = Tokenizer.from_dir(any_server.model_dir).encode(PROMPT)
    try:
        async with httpx.AsyncClient(timeout=60) as client, \
                grpc.aio.insecure_channel(cluster.grpc_target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = pb_grpc.MoeServeStub(channel)
            probes = {IN_PROCESS: in_process_probe(engine, prompt_ids)}
            for name, server in servers.items():
                probes[f"HTTP ({name})"] = http_probe(client, server)
                probes[f"gRPC ({name})"] = grpc_probe(stub, server)
            probes.update(noop_probes(client, stub, cluster))
            return await measure(probes, rounds)
    finally:
        await engine.shutdown()


# -- report -------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def report(samples: dict[str, Samples], engines: list[str]) -> None:
    rows = [(name, len(s.values), ms(s.median), ms(percentile(s, 90)), ms(percentile(s, 99)),
             ms(min(s.values)), ms(max(s.values)))
            for name, s in samples.items()]
    print()
    print_table(("system", "calls", "median ms", "p90 ms", "p99 ms", "min ms", "max ms"), rows)

    def at(name: str, q: int) -> float:
        s = samples[name]
        return s.median if q == 50 else percentile(s, q)

    local = IN_PROCESS
    rows = []
    for e in engines:
        http, rpc = f"HTTP ({e})", f"gRPC ({e})"
        ratios = ((f"{http} / {local}", http, local), (f"{rpc} / {local}", rpc, local),
                  (f"{rpc} / {http}", rpc, http))
        for label, num, den in ratios:
            rows.append((label, *(f"{at(num, q) / at(den, q):.2f}×" for q in (50, 99)), ""))
        diffs = (
            (f"{http} − {local}", (http,), (local,)),
            (f"{rpc} − {local}", (rpc,), (local,)),
            (f"{http} − {NOOP_HTTP}", (http,), (NOOP_HTTP,)),
            (f"{rpc} − {NOOP_GRPC}", (rpc,), (NOOP_GRPC,)),
            (f"{http} − {NOOP_HTTP} − {local}", (http,), (NOOP_HTTP, local)),
            (f"{rpc} − {NOOP_GRPC} − {local}", (rpc,), (NOOP_GRPC, local)),
        )
        for label, plus, minus in diffs:
            rows.append((label, *(f"{ms(sum(at(n, q) for n in plus) - sum(at(n, q) for n in minus))} ms"
                                  for q in (50, 99)), f"{ms(paired_median(samples, plus, minus))} ms"))
    rows += [(f"{noop} / {local}", *(f"{at(noop, q) / at(local, q):.2f}×" for q in (50, 99)), "")
             for noop in (NOOP_HTTP, NOOP_GRPC)]
    print()
    print_table(("quantity", "at median", "at p99", "per-round median"), rows)
    print(f"  at median / at p99: ratios and differences of the systems' percentiles; per-round median:\n"
          f"  the median over rounds of the same difference taken within each round (its calls ran back to\n"
          f"  back, so slow drift on a shared box cancels). The engine replica admits requests through\n"
          f"  @serve.batch, which waits up to {DEFAULT_BATCH_WAIT_TIMEOUT_S * 1e3:g} ms for company: with "
          f"one request in flight that\n  wait is part of HTTP/gRPC − no-op − in-process.")


def paired_median(samples: dict[str, Samples], plus: tuple[str, ...], minus: tuple[str, ...]) -> float:
    """Median over rounds of Σ plus − Σ minus, each round's own calls (every system ran once per round)."""
    per_round = zip(*(samples[n].values for n in plus), *(samples[n].values for n in minus), strict=True)
    return statistics.median(sum(v[:len(plus)]) - sum(v[len(plus):]) for v in per_round)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", choices=list(ENGINES), default=["single"],
                    help="engine groups behind the gateway (each its own app): single-process, 1+2 workers")
    ap.add_argument("--rounds", type=int,
                    help="timed rounds, every system once each (default 200; 30 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 rounds")
    args = ap.parse_args()
    rounds = args.rounds or (30 if args.quick else 200)
    print(f"gateway latency: demo model, a greedy 1-token completion of {PROMPT!r}, one request at a time; "
          f"engines {args.engines}; {rounds} interleaved rounds after {WARM_UP_ROUNDS} warm-up rounds")
    # This box may be shared: a busy neighbour stalls everything, so say how busy it was.
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    t0 = time.perf_counter()
    import ray
    from ray import serve

    cluster = start_serve()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
            model_dir = write_demo_checkpoint(Path(tmp) / "demo", progress=False)
            servers = deploy(cluster, model_dir, args.engines)
            if "single" in servers:
                # Match the replica's torch threads, so in-process and the replica compute alike.
                torch.set_num_threads(replica_torch_threads(servers["single"].app_name))
            print(f"torch threads: in-process engine {torch.get_num_threads()}; apps ready after "
                  f"{time.perf_counter() - t0:.0f} s")
            samples, texts = asyncio.run(run_all(cluster, servers, model_dir, rounds))
    finally:
        serve.shutdown()
        ray.shutdown()
    generated = {name: text for name, text in texts.items() if name not in (NOOP_HTTP, NOOP_GRPC)}
    same = len(set(generated.values())) == 1
    print(f"greedy token text identical across {', '.join(generated)}: {same} "
          f"({generated[IN_PROCESS]!r})")
    report(samples, args.engines)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s; load average at end: "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
