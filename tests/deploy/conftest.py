"""deploy/serve/demo.yaml deployed the way `serve run`/`serve deploy` deploy a config, shared by the
live tests of this package (Ray + Serve start once: they cost seconds).

Ray runs on loopback with a metrics export port and a 1 s report interval, so the live scrape
and the Prometheus server see our families quickly. The config is used as written except for
what a test machine must change: the proxies' ports (free ones) and `model_dir` (the session's
demo checkpoint, instead of writing one into ~/.cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import pytest

from tests.deploy.manifests import DEPLOY, kuberay_docs, load_yaml_docs
from tests.e2e.conftest import free_port


@dataclass  # not frozen: it keeps the ledger of what clients were told
class Deployment:
    url: str  # the HTTP proxy; the app is at route prefix "/"
    grpc_port: int
    metrics_port: int
    model_name: str
    config: dict  # the Serve config as deployed
    # What clients were told, over the whole package: the exported counters must agree.
    completion_tokens: int = 0
    requests: int = 0

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def generate(self, prompts: int = 4, max_tokens: int = 6) -> None:
        """Some completions and a streamed chat through the official client; books what it was told."""
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)
        for i in range(prompts):
            r = client.completions.create(model=self.model_name, prompt=f"Deploy test {i}:",
                                          max_tokens=max_tokens + i, temperature=0.0)
            self.completion_tokens += r.usage.completion_tokens
            self.requests += 1
        with client.chat.completions.create(model=self.model_name, stream=True, max_tokens=max_tokens,
                                            messages=[{"role": "user", "content": "hello"}],
                                            stream_options={"include_usage": True}) as stream:
            for chunk in stream:
                if chunk.usage:
                    self.completion_tokens += chunk.usage.completion_tokens
        self.requests += 1


def demo_config(model_dir: str, http_port: int, grpc_port: int) -> dict:
    (config,) = load_yaml_docs(DEPLOY / "serve" / "demo.yaml")
    config["http_options"]["port"] = http_port
    config["grpc_options"]["port"] = grpc_port
    config["applications"][0]["args"]["model_dir"] = model_dir
    return config


@pytest.fixture(scope="package")
def demo_deployment(demo_model_dir) -> Deployment:
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    metrics_port = free_port()
    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        config = demo_config(str(demo_model_dir), free_port(), free_port())
        schema = ServeDeploySchema.model_validate(config)
        # What `serve run CONFIG.yaml` does (ray/serve/scripts.py): start Serve with the config's
        # proxy options, then hand the whole config to the controller, which runs our builder.
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=schema.proxy_location,
                                       grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
        client.deploy_apps(schema)
        url = f"http://127.0.0.1:{config['http_options']['port']}"
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=30).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # the proxy is not listening yet
            assert time.monotonic() < deadline, "the demo config's app never became ready"
            time.sleep(1.0)
        yield Deployment(url=url, grpc_port=config["grpc_options"]["port"], metrics_port=metrics_port,
                         model_name=config["applications"][0]["args"]["model_name"], config=config)
    finally:
        serve.shutdown()
        ray.shutdown()


def docs_of_kind(kind: str) -> list[dict]:
    """Every object of `kind` in deploy/kuberay/."""
    return [doc for _, doc in kuberay_docs() if doc.get("kind") == kind]


@pytest.fixture(scope="package")
def rayservice() -> dict:
    (service,) = docs_of_kind("RayService")
    return service
