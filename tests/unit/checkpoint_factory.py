"""Tiny Mixtral checkpoints for tests: written by transformers itself, or by hand.

`make_hf_checkpoint` is the oracle path (HF's own `save_pretrained`); `write_checkpoint`
writes any dict of tensors, so a test can break one thing on purpose. Everything is
seeded: the same arguments give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, MixtralForCausalLM

from workers.weights.config import ModelConfig
from workers.weights.weight_names import checkpoint_shapes

TINY_MIXTRAL: dict[str, Any] = {
    "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
}


def tiny_mixtral_config(**overrides: Any) -> MixtralConfig:
    return MixtralConfig(**{**TINY_MIXTRAL, **overrides})


def make_hf_model(*, seed: int = 0, **overrides: Any) -> MixtralForCausalLM:
    """A randomly initialised HF model; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MixtralForCausalLM(tiny_mixtral_config(**overrides)).eval()


def make_hf_checkpoint(
    model_dir: str | Path, *, sharded: bool = False, seed: int = 0, max_shard_size: str = "20KB",
    **mixtral_config_overrides: Any,
) -> Path:
    """`save_pretrained` of a seeded tiny model; sharded=True gives several shard files and
    a `model.safetensors.index.json`."""
    model_dir = Path(model_dir)
    model = make_hf_model(seed=seed, **mixtral_config_overrides)
    model.save_pretrained(model_dir, max_shard_size=max_shard_size if sharded else "10GB")
    return model_dir


def read_checkpoint_files(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in the directory, read directly (the
    reference a loader is compared with)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def hf_expert_weights(model: MixtralForCausalLM, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """w1/w2/w3 of one expert taken from the in-memory HF model. transformers 5 keeps the
    experts fused (gate_up_proj [E, 2F, H] = [w1; w3], down_proj [E, H, F] = w2) and
    renames them to the per-expert names only when saving, so this is an oracle that does
    not go through the files."""
    experts = model.model.layers[layer].mlp.experts
    F = model.config.intermediate_size
    gate_up = experts.gate_up_proj[expert].detach()
    return {"w1": gate_up[:F], "w2": experts.down_proj[expert].detach(), "w3": gate_up[F:]}


def random_tensors(cfg: ModelConfig, *, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A complete, correctly shaped set of tensors for `cfg`."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype)
            for name, shape in checkpoint_shapes(cfg).items()}


def write_checkpoint(
    model_dir: str | Path, config: ModelConfig | dict[str, Any], tensors: dict[str, torch.Tensor], *,
    num_shards: int = 1,
) -> Path:
    """config.json plus the tensors: one `model.safetensors`, or `num_shards` shards (names
    dealt round-robin) with an index. `config` may be a raw dict to write a bad one."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    raw = config.to_hf_dict() if isinstance(config, ModelConfig) else config
    (model_dir / "config.json").write_text(json.dumps(raw, indent=2))
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    if num_shards == 1:
        save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
        return model_dir
    names = list(tensors)
    weight_map = {}
    for k in range(num_shards):
        file = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        shard = {name: tensors[name] for name in names[k::num_shards]}
        save_file(shard, model_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return model_dir
