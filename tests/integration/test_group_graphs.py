"""The group's decode graphs (workers/group/worker_graphs.py) on CPUs: 2 attention + 2 expert workers
in processes of their own over gloo, driven by the real engine (tests/group_graphs_harness.py), with
the eager stand-in for CUDA graph capture: the same capture protocol (every rank, every bucket, the
same order, a warm-up each), static buffers, padding and replay bookkeeping as on GPUs, compared
with the same group run eagerly. On GPUs over NCCL the same harness captures CUDA graphs
(tests/gpu/test_group_graphs_gpu.py)."""

from __future__ import annotations

import pytest

from tests.group_graphs_harness import GroupCase, run_group
from tests.model_helpers import save_hf_mixtral

BUCKETS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("group_graphs")
    save_hf_mixtral(out / "model", num_hidden_layers=2, max_position_embeddings=512)
    case = GroupCase(model_dir=str(out / "model"), out_path=str(out / "report.json"), buckets=BUCKETS,
                     num_attention_workers=2, num_requests=20)
    return run_group(case)


def assert_close_logprobs(got, want, tol):
    for g, w in zip(got, want, strict=True):
        assert len(g) == len(w)
        assert all(abs(a - b) <= tol for a, b in zip(g, w, strict=True)), (g, w)


@pytest.mark.timeout(300)
def test_every_rank_captures_the_same_buckets(report):
    assert report["captured"] == [list(BUCKETS)] * 4


@pytest.mark.timeout(300)
def test_replayed_steps_equal_eager_steps_at_every_bucket(report):
    eager, graphs = report["eager"], report["graphs"]
    assert {int(b) for b, n in graphs["replays"].items() if n} == set(BUCKETS)  # every bucket replayed
    assert eager["replays"] == {}
    assert graphs["ids"] == eager["ids"]
    assert_close_logprobs(graphs["logprobs"], eager["logprobs"], 1e-4)
    assert eager["preemptions"] > 0 and graphs["preemptions"] == eager["preemptions"]


@pytest.mark.timeout(300)
def test_a_worker_with_no_sequence_replays_padding_only(report):
    """Its all-to-alls are in its graph: it replays with the others, or they would wait for it."""
    assert report["graphs"]["idle_replays"] > 0


@pytest.mark.timeout(300)
def test_padding_rows_are_not_load(report):
    """The expert workers counted the same rows with padded replays as eagerly: padding unsent."""
    assert report["graphs"]["expert_tokens"] == report["eager"]["expert_tokens"] > 0


@pytest.mark.timeout(300)
def test_an_abort_between_replays(report):
    eager, graphs = report["eager"]["abort"], report["graphs"]["abort"]
    assert graphs == eager and graphs["blocks_after_abort"] == 0 and len(graphs["other"]) == 12


@pytest.mark.timeout(300)
def test_a_restarted_group_captures_again_and_serves_the_same(report):
    restart = report["restart"]
    assert report["restarted"]
    assert restart["ids"] == report["eager"]["ids"]
    assert sum(restart["replays"].values()) > 0  # the new graphs, captured after the re-form, replayed
