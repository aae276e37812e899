"""The demo checkpoint's router skew: hot experts really take most top-k picks, skew 0 changes
nothing, the skew is part of the checkpoint's identity, and transformers still generates with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.tokenizer import Tokenizer
from gateway.demo_checkpoint import (
    MARKER_FILE,
    default_demo_dir,
    ensure_demo_checkpoint,
    is_demo_checkpoint,
    write_demo_checkpoint,
)
from gateway.demo_corpus import demo_corpus
from gateway.demo_router_skew import hot_experts
from tests.model_helpers import greedy_generate, prefill_logits
from workers.model.loader import load_local_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SKEW = 2.0
TEXTS = demo_corpus(num_lines=48, seed=7)  # not the tokenizer's training lines (seed 1234)


@pytest.fixture(scope="module")
def skewed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("skewed"), router_skew=SKEW, progress=False)


class CountingDispatcher:
    """Our local dispatcher, counting every layer's top-k picks per expert on the way through."""

    def __init__(self, inner, num_layers: int, num_experts: int) -> None:
        self.inner = inner
        self.counts_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64)

    def dispatch(self, layer, x_TH, routing):
        num_experts = self.counts_LE.shape[1]
        self.counts_LE[layer] += torch.bincount(routing.topk_ids_TK.flatten(), minlength=num_experts)
        return self.inner.dispatch(layer, x_TH, routing)

    def combine(self, layer, y_MH, plan):
        return self.inner.combine(layer, y_MH, plan)


def expert_counts(model_dir: Path) -> torch.Tensor:
    """[L, E] top-k picks per expert over the corpus texts, through our model."""
    model = load_local_model(model_dir)
    counting = CountingDispatcher(model.dispatcher, model.cfg.num_hidden_layers, model.cfg.num_local_experts)
    model.dispatcher = counting
    tok = Tokenizer.from_dir(model_dir)
    for text in TEXTS:
        prefill_logits(model, tok.encode(text))
    return counting.counts_LE


def hot_share(counts_LE: torch.Tensor) -> torch.Tensor:
    """[L]: the share of each layer's picks that went to its hot experts (seed 0)."""
    num_experts = counts_LE.shape[1]
    hot = [counts_LE[layer, hot_experts(layer, num_experts, seed=0)].sum() for layer in range(len(counts_LE))]
    return torch.stack(hot).double() / counts_LE.sum(dim=1)


def test_skew_sends_most_picks_to_the_hot_experts(demo_model_dir: Path, skewed_dir: Path) -> None:
    plain, skewed = expert_counts(demo_model_dir), expert_counts(skewed_dir)
    assert plain.sum() == skewed.sum() == plain.sum(dim=1)[0] * plain.shape[0]  # same tokens, top-2
    imbalance_plain = (plain.max(dim=1).values / plain.double().mean(dim=1)).mean().item()
    imbalance_skewed = (skewed.max(dim=1).values / skewed.double().mean(dim=1)).mean().item()
    # Measured: 1.57 at skew 0 (random routers are not perfectly even), 3.05 at skew 2 (4 is the
    # most top-2 of 8 allows: one expert in every token's picks).
    assert imbalance_plain < 2.0
    assert imbalance_skewed >= 2.5
    # The hot quarter of experts: about a quarter of the picks at skew 0 (0.18 to 0.36 by layer),
    # most of them at skew 2 (0.55 to 0.91), and more on every layer.
    plain_hot, skewed_hot = hot_share(plain), hot_share(skewed)
    assert plain_hot.mean() < 0.4
    assert skewed_hot.mean() > 0.6
    assert (skewed_hot - plain_hot).min() > 0.25, (plain_hot, skewed_hot)


def test_skew_changes_only_the_routers_and_the_marker(demo_model_dir: Path, skewed_dir: Path) -> None:
    plain = load_file(demo_model_dir / "model.safetensors")
    skewed = load_file(skewed_dir / "model.safetensors")
    changed = sorted(name for name in plain if not torch.equal(plain[name], skewed[name]))
    assert changed == [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(4)]
    for layer, name in enumerate(changed):
        rows = (plain[name] != skewed[name]).any(dim=1).nonzero().flatten().tolist()
        assert rows == hot_experts(layer, 8, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (skewed_dir / name).read_bytes() == (demo_model_dir / name).read_bytes()
    assert json.loads((skewed_dir / MARKER_FILE).read_text()) == {
        "format_version": 1, "seed": 0, "router_skew": SKEW}


def test_skew_zero_is_the_plain_checkpoint(demo_model_dir: Path, tmp_path: Path) -> None:
    out = write_demo_checkpoint(tmp_path, router_skew=0.0, progress=False)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == {
        f.name: f.read_bytes() for f in demo_model_dir.iterdir()}


def test_a_skewed_checkpoint_never_passes_for_the_plain_one(skewed_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_demo_checkpoint(skewed_dir, router_skew=SKEW)
    assert not is_demo_checkpoint(skewed_dir)
    assert not is_demo_checkpoint(skewed_dir, router_skew=1.0)
    monkeypatch.setenv("MOE_SERVE_DEMO_DIR", str(tmp_path / "cache" / "demo"))
    assert default_demo_dir() == tmp_path / "cache" / "demo"
    assert default_demo_dir(2.0) == tmp_path / "cache" / "demo-router-skew-2"
    assert default_demo_dir(0.5) == tmp_path / "cache" / "demo-router-skew-0.5"
    # A plain ensure over a skewed directory rewrites it as the plain checkpoint.
    out = tmp_path / "reuse"
    ensure_demo_checkpoint(out, router_skew=SKEW, progress=False)
    ensure_demo_checkpoint(out, progress=False)
    assert is_demo_checkpoint(out) and not is_demo_checkpoint(out, router_skew=SKEW)


@pytest.mark.parametrize("bad", ["-1", "nan", "inf"])
def test_cli_refuses_a_bad_skew(bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["demo-model", "--router-skew", bad, "--output", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-serve demo-model: router skew must be a finite number >= 0")
    assert "Traceback" not in err
    assert not (tmp_path / "demo").exists()
    assert main(["serve", "--router-skew", bad]) == 2
    assert "router skew must be" in capsys.readouterr().err


def test_serve_takes_router_skew_only_for_the_demo(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["serve", "--router-skew", "1", "--model", str(tmp_path)]) == 2
    assert "moe-serve demo-model --router-skew S DIR" in capsys.readouterr().err


def test_cli_writes_the_same_bytes_in_another_process(skewed_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "demo-model", "--router-skew", "2",
                             "--output", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True, timeout=300)
    assert Path(result.stdout.strip()) == out.resolve()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == {
        f.name: f.read_bytes() for f in skewed_dir.iterdir()}


def test_transformers_generates_greedily_with_it_as_we_do(skewed_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(skewed_dir).eval()
    prompt = Tokenizer.from_dir(skewed_dir).encode("Alice sees the small cat in Paris.")
    ours = greedy_generate(load_local_model(skewed_dir), prompt, 12)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
        logits = hf(torch.tensor([prompt + ours])).logits[0]
    assert ours == ref
    assert torch.isfinite(logits).all() and 1.0 < logits.std().item() < 10.0  # not saturated
