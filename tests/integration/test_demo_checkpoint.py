"""The built-in demo checkpoint: layout, determinism, atomic writing, and transformers as oracle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cluster.tokenizer import Tokenizer
from gateway import demo_checkpoint
from gateway.demo_checkpoint import (
    CHECKPOINT_FILES,
    DEMO_VOCAB_SIZE,
    demo_config,
    ensure_demo_checkpoint,
    write_demo_checkpoint,
)
from gateway.demo_corpus import demo_corpus
from workers.weights.config import ModelConfig
from workers.weights.weight_names import checkpoint_shapes

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TEXTS = [
    "Hello world!", "  leading and trailing spaces  ", "[INST] What is 12 + 30? [/INST] 42.",
    "café, naïve, 東京, 🙂🚀 and tabs\tand\nnewlines", "</s> special <s> strings <unk> inside",
    *demo_corpus(num_lines=20, seed=99),
]


def _file_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_layout_matches_weight_names(demo_model_dir: Path) -> None:
    assert sorted(f.name for f in demo_model_dir.iterdir()) == sorted(CHECKPOINT_FILES)
    cfg = ModelConfig.from_dir(demo_model_dir)
    assert cfg == demo_config(DEMO_VOCAB_SIZE)
    with safe_open(demo_model_dir / "model.safetensors", framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}
    assert shapes == checkpoint_shapes(cfg)
    assert Tokenizer.from_dir(demo_model_dir).vocab_size == cfg.vocab_size


def test_tokenizer_and_generation_config(demo_model_dir: Path) -> None:
    tok = Tokenizer.from_dir(demo_model_dir)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.chat_template) == (1, (2,), None)
    generation = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_same_seed_same_bytes_in_another_process(demo_model_dir: Path, tmp_path: Path) -> None:
    # Another process (new hash seeds, new tokenizers thread pool) through the CLI.
    out = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "demo-model", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True, timeout=300)
    assert Path(result.stdout.strip()) == out.resolve()
    assert _file_bytes(out) == _file_bytes(demo_model_dir)


def test_seed_changes_weights_not_tokenizer(demo_model_dir: Path, tmp_path: Path) -> None:
    other = _file_bytes(write_demo_checkpoint(tmp_path, seed=1, progress=False))
    same = _file_bytes(demo_model_dir)
    assert other["model.safetensors"] != same["model.safetensors"]
    assert other["tokenizer.json"] == same["tokenizer.json"]
    assert other["config.json"] == same["config.json"]


def test_transformers_loads_it_and_logits_are_useful(demo_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    ids = Tokenizer.from_dir(demo_model_dir).encode("Alice sees the small cat in Paris.")
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True, output_router_logits=True)
    logits = out.logits[0]
    assert torch.isfinite(logits).all()
    assert 1.0 < logits.std().item() < 10.0  # neither uniform noise nor saturated
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # greedy choices are not float ties
    assert max(h.abs().max().item() for h in out.hidden_states) < 100
    # Every expert of every layer gets some top-2 traffic on a short prompt batch.
    chosen = torch.cat([r.topk(2, dim=-1).indices.flatten() for r in out.router_logits])
    assert len(chosen.unique()) == 8


def test_auto_tokenizer_agrees_with_ours(demo_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo_model_dir)
    ours = Tokenizer.from_dir(demo_model_dir)
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (1, 2, ours.vocab_size)
    for text in SAMPLE_TEXTS:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_bos=False), text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), text


def test_ensure_writes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_SERVE_DEMO_DIR", str(tmp_path / "cache" / "demo"))
    out = ensure_demo_checkpoint(progress=False)
    assert out == tmp_path / "cache" / "demo"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint(out, progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in out.parent.iterdir()] == ["demo"]  # no temporary directories left


def test_ensure_replaces_an_incomplete_checkpoint(demo_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "config.json").write_text("{}")
    ensure_demo_checkpoint(out, progress=False)
    assert _file_bytes(out) == _file_bytes(demo_model_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_ensure_never_replaces_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo checkpoint"):
        ensure_demo_checkpoint(tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_crash_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(demo_checkpoint, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ensure_demo_checkpoint(tmp_path / "demo", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import build_parser, main

    assert "demo-model" in build_parser().format_help()
    with pytest.raises(SystemExit):
        main([])
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo-model", str(tmp_path)]) == 1
    assert "not a demo checkpoint" in capsys.readouterr().err
