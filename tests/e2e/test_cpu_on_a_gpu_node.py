"""`moe-serve serve --device cpu` on a node where CUDA looks available.

Every process of the run (the CLI, Ray's workers, the Serve replicas) imports a
sitecustomize that makes `torch.cuda.is_available()` say True, as on a GPU node. Before the
device decision this made every rank pick NCCL for CPU tensors and every request fail
("No backend type associated with device type cpu"). Now the group's backend follows the
ranks' devices, so a CPU group on a GPU node stays on gloo and answers as transformers does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port
from tests.serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240.0

FAKE_CUDA = '''\
import os
if os.environ.get("MOE_SERVE_TEST_FAKE_CUDA") == "1":
    import torch
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    # Leave a mark per process, so the test can see Ray's workers were patched too.
    open(os.path.join(os.environ["MOE_SERVE_TEST_FAKE_CUDA_MARKS"], str(os.getpid())), "w").close()
'''


@pytest.fixture(scope="module")
def cpu_server_on_cuda_node(tmp_path_factory, demo_model_dir):
    site = tmp_path_factory.mktemp("fake-cuda-site")
    (site / "sitecustomize.py").write_text(FAKE_CUDA)
    marks = tmp_path_factory.mktemp("fake-cuda-marks")
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
           "MOE_SERVE_TEST_FAKE_CUDA": "1", "MOE_SERVE_TEST_FAKE_CUDA_MARKS": str(marks)}
    server = ServeProcess(
        ["--model", str(demo_model_dir), "--model-name", "demo", "--device", "cpu", "--expert-workers", "2",
         "--cpus-per-worker", "0.1", "--num-kv-blocks", "128", "--port", str(port), "--grpc-port",
         str(grpc_port), "--metrics-port", "0", "--graceful-shutdown-timeout-s", "5"],
        tmp_path_factory.mktemp("serve-log") / "serve.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready(url, START_TIMEOUT_S)
        yield url, marks
    finally:
        server.stop()


def test_cpu_group_on_a_cuda_looking_node_answers_as_transformers(cpu_server_on_cuda_node, demo_model_dir):
    import openai
    import torch
    from transformers import AutoModelForCausalLM

    from cluster.tokenizer import Tokenizer

    url, marks = cpu_server_on_cuda_node
    # The premise: the CLI and Ray's worker processes all believed CUDA was there.
    assert len(list(marks.iterdir())) >= 4
    tokenizer = Tokenizer.from_dir(demo_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    for text in ("The river runs", "Seven plus five is"):
        prompt_ids = tokenizer.encode(text)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
        got = client.completions.create(model="demo", prompt=prompt_ids, max_tokens=10, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert got.usage.completion_tokens == 10
        assert got.choices[0].text == tokenizer.decode(ref)
