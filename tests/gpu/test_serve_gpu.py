"""`moe-serve serve --gpus-per-worker 0.25` on one GPU answers the official openai client with the CPU's ids.

The real command, as a subprocess that starts its own Ray: 1 attention + 3 expert workers on a
quarter of the GPU each (the "staged" backend), the demo checkpoint in its own dtype (fp32).
The oracle is the single-process engine on the CPU, greedy, on the same token-id prompts: the
served text must be what those ids decode to, token for token, and the workers must hold GPU
memory while they serve (a server that quietly fell back to the CPU would not).
"""

from __future__ import annotations

import random

import pytest
import torch

from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from tests.e2e.conftest import free_port
from tests.engine_helpers import run_requests
from tests.serve_process import ServeProcess
from workers.model.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

READY_TIMEOUT_S = 240.0
MAX_TOKENS = 16
NUM_PROMPTS = 8
# Four processes with a CUDA context and the demo weights; anything on the CPU allocates none.
MIN_GPU_BYTES_HELD = 1 << 30


def token_prompts(seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 2048) for _ in range(rng.randint(2, 30))] for _ in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def cpu_reference(cuda_device, demo_model_dir) -> list[dict]:
    engine = build_local_engine(demo_model_dir, EngineConfig(num_kv_blocks=256), dtype="float32",
                                device="cpu")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return run_requests(engine, [(p, params, 0) for p in token_prompts()])


@pytest.fixture(scope="module")
def served(cuda_device, demo_model_dir, tmp_path_factory):
    """The server's base URL once /ready answers 200, and the GPU memory it holds; stopped after."""

    torch.cuda.empty_cache()  # what earlier tests cached is not the server's
    free_before, _ = torch.cuda.mem_get_info(cuda_device)
    port = free_port()
    server = ServeProcess(
        ["--model", str(demo_model_dir), "--attention-workers", "1", "--expert-workers", "3",
         "--gpus-per-worker", "0.25", "--num-kv-blocks", "512", "--host", "127.0.0.1", "--port", str(port),
         "--grpc-port", str(free_port()), "--metrics-port", "0", "--graceful-shutdown-timeout-s", "5"],
        tmp_path_factory.mktemp("serve") / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready(url, READY_TIMEOUT_S)
        free_serving, _ = torch.cuda.mem_get_info(cuda_device)
        yield url, free_before - free_serving
    finally:
        server.stop()


def test_serve_on_a_shared_gpu_answers_openai_with_the_cpu_greedy_ids(cuda_device, cpu_reference, served):
    import openai

    url, gpu_bytes_held = served
    assert gpu_bytes_held >= MIN_GPU_BYTES_HELD, f"the workers hold only {gpu_bytes_held} bytes of GPU memory"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        (model,) = [m.id for m in client.models.list().data]
        for prompt, want in zip(token_prompts(), cpu_reference, strict=True):
            got = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0.0, extra_body={"ignore_eos": True})
            assert got.usage.completion_tokens == len(want["token_ids"]) == MAX_TOKENS
            assert got.choices[0].text == want["text"]
    finally:
        client.close()
