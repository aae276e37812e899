"""The built-in demo model: a small, random, Mixtral-shaped HuggingFace checkpoint made locally.

Nothing is downloaded: the tokenizer is trained here on `demo_corpus` and the weights are drawn
from seeded generators, so the same seed writes the same bytes on every machine, in seconds.
The directory is an ordinary HF checkpoint (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json): `transformers` loads it, and so does our loader.

Why a byte-level BPE tokenizer (GPT-2 style ByteLevel pre-tokenizer and decoder): its base
alphabet is the 256 bytes, so every Unicode string encodes and decodes back to itself exactly,
with no `<unk>`, no normalizer and no added or stripped leading space. That makes "decode(encode
(text)) == text" a property tests can check for any text. Mixtral's own SentencePiece tokenizer
(Metaspace + byte fallback) is handled by the same `cluster.tokenizer` code.

Weights use fan-in scaling (std = gain / sqrt(fan_in)) rather than a flat 0.02: with hidden 256
that keeps every layer's output near unit scale, attention and router logits spread enough that
routing and argmax are not near ties, and final logits with std about 3 (not uniform noise).

A router skew S > 0 (gateway/demo_router_skew.py) tilts every layer's router toward a few hot
experts, so expert-load imbalance shows. It is part of the checkpoint's identity, like the seed:
it is in the marker file and in the default cache directory's name, so a skewed checkpoint is
never taken for the plain one. S = 0 writes exactly the plain checkpoint's bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from gateway.demo_corpus import demo_corpus
from gateway.demo_router_skew import check_router_skew, skew_routers
from workers.weights.config import ModelConfig
from workers.weights.weight_names import checkpoint_shapes

DEMO_FORMAT_VERSION = 1  # bump when the bytes a seed produces change; stale caches are rewritten
DEMO_VOCAB_SIZE = 2048
UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ids 0, 1, 2 as in Mixtral
MARKER_FILE = "moe_serve_demo.json"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", MARKER_FILE)


def demo_config(vocab_size: int = DEMO_VOCAB_SIZE) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )


def default_demo_dir(router_skew: float = 0.0) -> Path:
    """`$MOE_SERVE_DEMO_DIR`, else `~/.cache/moe-serve/demo-model`; a skewed checkpoint's is a
    sibling named after its skew (`demo-model-router-skew-2`), so each skew has its own cache."""
    env = os.environ.get("MOE_SERVE_DEMO_DIR")
    plain = Path(env).expanduser() if env else Path.home() / ".cache" / "moe-serve" / "demo-model"
    if check_router_skew(router_skew) == 0:
        return plain
    return plain.with_name(f"{plain.name}-router-skew-{router_skew:g}")


def train_demo_tokenizer(vocab_size: int = DEMO_VOCAB_SIZE) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer trained on the demo corpus; `<unk>`, `<s>`, `</s>` = 0, 1, 2."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(demo_corpus(), trainer)
    # Like Mixtral's tokenizer.json: a plain `encode` (transformers' default) prepends BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return tok


def write_demo_tokenizer(out_dir: str | Path) -> tokenizers.Tokenizer:
    """tokenizer.json and tokenizer_config.json (no chat_template: the built-in [INST] format)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_demo_tokenizer()
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n")
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": demo_config().max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    })
    return tok


def demo_weights(cfg: ModelConfig, seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of `checkpoint_shapes(cfg)`, each from its own generator (name-derived seed)."""
    tensors = {}
    for name, shape in tqdm(sorted(checkpoint_shapes(cfg).items()), desc="demo weights",
                            disable=not progress, leave=False):
        tensors[name] = _init_tensor(name, shape, seed)
    return tensors


def write_demo_checkpoint(out_dir: str | Path, *, seed: int = 0, router_skew: float = 0.0,
                          progress: bool = True) -> Path:
    """Write the demo checkpoint into `out_dir` (created if needed) and return its path."""
    check_router_skew(router_skew)
    out = Path(out_dir)
    tok = write_demo_tokenizer(out)
    cfg = demo_config(vocab_size=tok.get_vocab_size(with_added_tokens=True))
    _write_json(out / "config.json", cfg.to_hf_dict())
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    _write_json(out / "generation_config.json", generation)
    weights = skew_routers(demo_weights(cfg, seed, progress), cfg, router_skew, seed)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    # Written last: its presence says the rest is complete (see `ensure_demo_checkpoint`).
    _write_json(out / MARKER_FILE, demo_marker(seed, router_skew))
    return out


def demo_marker(seed: int, router_skew: float) -> dict[str, Any]:
    """What the marker file holds: the checkpoint's identity. No skew key for S = 0, so the
    plain checkpoint's marker (and bytes) are what they were before skew existed."""
    marker: dict[str, Any] = {"format_version": DEMO_FORMAT_VERSION, "seed": seed}
    if check_router_skew(router_skew):
        marker["router_skew"] = float(router_skew)
    return marker


def ensure_demo_checkpoint(
    out_dir: str | Path | None = None, *, seed: int = 0, router_skew: float = 0.0, progress: bool = True,
) -> Path:
    """The demo checkpoint at `out_dir` (default `default_demo_dir(router_skew)`), written only if
    missing.

    A directory that is incomplete, stale (older format) or of another seed or skew is replaced; one
    holding anything else raises `FileExistsError` rather than being deleted. The new
    one is written to a temporary sibling and renamed into place, so a crash never leaves a half
    checkpoint and concurrent callers (several actors on one host) each see a whole one.
    """
    identity = {"seed": seed, "router_skew": router_skew}
    out = Path(out_dir).expanduser() if out_dir is not None else default_demo_dir(router_skew)
    if is_demo_checkpoint(out, **identity):
        return out
    if out.exists() and not _holds_only_demo_files(out):
        raise FileExistsError(f"{out} exists and is not a demo checkpoint; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is an ordinary directory
    try:
        write_demo_checkpoint(tmp, **identity, progress=progress)
        if out.exists() and not is_demo_checkpoint(out, **identity):
            stale = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, stale / out.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_demo_checkpoint(out, **identity):  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_demo_checkpoint(path: str | Path, *, seed: int = 0, router_skew: float = 0.0) -> bool:
    path = Path(path)
    if not all((path / name).is_file() for name in CHECKPOINT_FILES):
        return False
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker == demo_marker(seed, router_skew)


def _holds_only_demo_files(path: Path) -> bool:
    """An empty directory, or a partial or stale demo checkpoint: safe to replace."""
    return path.is_dir() and all(p.name in CHECKPOINT_FILES for p in path.iterdir())


def _init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    # torch's CPU generator keeps only 32 bits of its seed, so mix seed and name into 32 bits.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    fan_in = shape[-1]
    # Embedding rows feed the residual stream directly: unit scale like every layer's output.
    # Router and LM head get a gain > 1 so their logits are spread, not near ties.
    if name == "model.embed_tokens.weight":
        std = 1.0
    elif name.endswith("block_sparse_moe.gate.weight"):
        std = 2.0 / fan_in**0.5
    elif name == "lm_head.weight":
        std = 3.0 / fan_in**0.5
    else:
        std = 1.0 / fan_in**0.5
    return torch.randn(shape, generator=gen) * std


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
