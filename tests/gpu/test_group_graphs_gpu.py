"""The group's decode CUDA graphs (workers/group/worker_graphs.py) on GPUs: 1 attention worker and
1 expert worker (2 with 3 GPUs; 2 + 2 with 4, where an attention worker with no sequence in a step
replays padding only) in processes of their own, one GPU each, over NCCL, driven by the real
engine (tests/group_graphs_harness.py), fp32 with TF32 off, compared with the same group run
eagerly: at every bucket the same greedy ids and logprobs within 1e-3, across preemptions by
recompute, an abort mid-stream and a re-formed group (the expert workers replaced, every rank
capturing again); the expert workers count the same rows as eagerly (padding rows are not sent).

NCCL refuses two ranks on one GPU (a group sharing one GPU runs "staged", whose collectives
cannot be captured and stay eager): so this needs two GPUs, and skips with that reason on one.
The same harness runs on CPUs over gloo with the eager stand-in for capture
(tests/integration/test_group_graphs.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.group_graphs_harness import GroupCase, run_group
from tests.model_helpers import save_hf_mixtral

pytestmark = pytest.mark.gpu

BUCKETS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def report(cuda_device, tmp_path_factory):
    num_gpus = torch.cuda.device_count()
    if num_gpus < 2:
        pytest.skip(f"a group with decode graphs needs NCCL between two GPUs; this machine has {num_gpus} "
                    "(NCCL refuses two ranks on one GPU)")
    out = tmp_path_factory.mktemp("group_graphs_gpu")
    save_hf_mixtral(out / "model", num_hidden_layers=2, max_position_embeddings=512)
    attention = 2 if num_gpus >= 4 else 1
    case = GroupCase(model_dir=str(out / "model"), out_path=str(out / "report.json"), device="cuda",
                     backend="nccl", num_attention_workers=attention,
                     num_expert_workers=min(num_gpus - attention, 2), buckets=BUCKETS,
                     num_requests=10 * attention + 4)
    return run_group(case)


def test_every_rank_captures_every_bucket(report):
    assert all(b == list(BUCKETS) for b in report["captured"]), report["captured"]


def test_replay_equals_eager_in_the_group_at_every_bucket(report):
    eager, graphs = report["eager"], report["graphs"]
    # Every bucket replayed on the attention worker: its Triton kernel loaded, its graphs ran.
    assert {int(b) for b, n in graphs["replays"].items() if n} == set(BUCKETS), graphs["replays"]
    assert graphs["ids"] == eager["ids"]
    for g, w in zip(graphs["logprobs"], eager["logprobs"], strict=True):
        assert all(abs(a - b) <= 1e-3 for a, b in zip(g, w, strict=True)), (g, w)
    assert eager["preemptions"] > 0 and graphs["preemptions"] == eager["preemptions"]
    assert graphs["expert_tokens"] == eager["expert_tokens"] > 0
    if len(report["captured"]) == 4:  # 2 attention workers: one of them replayed padding only
        assert graphs["idle_replays"] > 0


def test_replay_across_an_abort(report):
    eager, graphs = report["eager"]["abort"], report["graphs"]["abort"]
    assert graphs == eager and graphs["blocks_after_abort"] == 0


def test_replay_after_the_group_re_formed(report):
    assert report["restarted"]
    assert report["restart"]["ids"] == report["eager"]["ids"]
    assert sum(report["restart"]["replays"].values()) > 0
