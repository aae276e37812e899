"""Load an HF-format Mixtral checkpoint directory (config.json + safetensors).

`Checkpoint.open` reads the config and every file header, and checks the tensor names and
shapes against `weight_names.checkpoint_shapes` before a byte of weight data is read, so a
bad checkpoint fails in milliseconds with a message naming the tensor or file. `load`
then reads only the tensors asked for (memory-mapped, one shard at a time): an expert
worker reads its own experts, an attention worker everything else.

Shapes: H hidden_size, F intermediate_size. Expert weights are w1 [F, H] (gate),
w3 [F, H] (up), w2 [H, F] (down): expert(x) = w2 @ (silu(w1 @ x) * (w3 @ x)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from workers.weights.checkpoint_index import (
    FLOAT_DTYPE_TAGS,
    CheckpointError,
    TensorInfo,
    index_tensors,
)
from workers.weights.config import ModelConfig
from workers.weights.dtypes import parse_dtype
from workers.weights.weight_names import (
    EXPERT_PROJECTIONS,
    all_expert_pairs,
    attention_weight_shapes,
    checkpoint_shapes,
    expert_shapes_for,
    expert_weight_name,
)

__all__ = ["Checkpoint", "CheckpointError", "ExpertTensors", "LoadedCheckpoint", "load_checkpoint"]

EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
_MAX_LISTED = 5  # a wrong checkpoint can be wrong in thousands of tensors; name a few


@dataclass(frozen=True)
class ExpertTensors:
    w1: torch.Tensor  # [F, H]
    w2: torch.Tensor  # [H, F]
    w3: torch.Tensor  # [F, H]


class Checkpoint:
    """A validated checkpoint directory. Build it with `Checkpoint.open(model_dir)`."""

    def __init__(self, model_dir: Path, config: ModelConfig, tensors: dict[str, TensorInfo]) -> None:
        self.model_dir = model_dir
        self.config = config
        self._tensors = tensors
        self.tensors_read: set[str] = set()  # every name `load` has read, over all calls

    @classmethod
    def open(cls, model_dir: str | Path) -> Checkpoint:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"checkpoint directory {model_dir} does not exist")
        config = ModelConfig.from_dir(model_dir)  # ConfigError propagates
        tensors = index_tensors(model_dir)
        expected = checkpoint_shapes(config)
        if (config.tie_word_embeddings and LM_HEAD in tensors
                and tensors[LM_HEAD].shape == expected[EMBEDDING]):
            del tensors[LM_HEAD]  # some tied checkpoints store the copy anyway; we use the embedding
        _check_matches(model_dir, tensors, expected)
        return cls(model_dir, config, {name: tensors[name] for name in expected})

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def stored_dtype_tag(self, name: str) -> str:
        """The safetensors dtype tag ("BF16", ...) the tensor is stored in."""
        return self._info(name).dtype

    def nbytes(self, names: Iterable[str], dtype: str | torch.dtype) -> int:
        """What `load(names, dtype)` will hold in memory: checked against a GPU before loading."""
        itemsize = torch.empty((), dtype=parse_dtype(dtype, auto=self.config.torch_dtype)).element_size()
        return sum(math.prod(self.shape(name)) for name in dict.fromkeys(names)) * itemsize

    def attention_weight_bytes(self, dtype: str | torch.dtype) -> int:
        return self.nbytes(attention_weight_shapes(self.config), dtype)

    def expert_weight_bytes(self, pairs: Iterable[tuple[int, int]], dtype: str | torch.dtype) -> int:
        return self.nbytes(expert_shapes_for(self.config, pairs), dtype)

    def load(
        self, names: Iterable[str], dtype: str | torch.dtype, *, progress: bool = True,
        device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Read `names`, cast to `dtype` ("auto": config.json's torch_dtype), in the order
        asked. Files are memory-mapped and visited once each, in file order."""
        target = parse_dtype(dtype, auto=self.config.torch_dtype)
        names = list(dict.fromkeys(names))
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self._info(name).file, []).append(name)
        # disable=None lets tqdm switch itself off when stderr is not a terminal.
        bar = tqdm(sorted(by_file.items()), desc="loading shards", unit="shard",
                   disable=None if progress else True)
        loaded: dict[str, torch.Tensor] = {}
        for file, file_names in bar:
            loaded.update(self._read_file(file, file_names, target, str(device)))
        return {name: loaded[name] for name in names}

    def load_attention_weights(
        self, dtype: str | torch.dtype, progress: bool = True, *, device: str | torch.device = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Every non-expert tensor, keyed by HF name. With tie_word_embeddings the checkpoint
        has no lm_head; "lm_head.weight" is then the embedding tensor itself (shared)."""
        weights = self.load(attention_weight_shapes(self.config), dtype, progress=progress, device=device)
        if self.config.tie_word_embeddings:
            weights[LM_HEAD] = weights[EMBEDDING]
        return weights

    def load_expert_weights(
        self, pairs: Iterable[tuple[int, int]], dtype: str | torch.dtype, progress: bool = True, *,
        device: str | torch.device = "cpu",
    ) -> dict[tuple[int, int], ExpertTensors]:
        """The (layer, expert) pairs asked for, and nothing else is read."""
        pairs = list(dict.fromkeys((int(layer), int(expert)) for layer, expert in pairs))
        try:
            names = list(expert_shapes_for(self.config, pairs))
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        weights = self.load(names, dtype, progress=progress, device=device)
        return {
            (layer, expert): ExpertTensors(
                **{proj: weights[expert_weight_name(layer, expert, proj)] for proj in EXPERT_PROJECTIONS}
            )
            for layer, expert in pairs
        }

    def _info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise CheckpointError(f"checkpoint {self.model_dir} has no tensor {name!r}")
        return self._tensors[name]

    def _read_file(self, file: str, names: list[str], dtype: torch.dtype,
                   device: str) -> dict[str, torch.Tensor]:
        out = {}
        try:
            with safe_open(self.model_dir / file, framework="pt", device=device) as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    self.tensors_read.add(name)
                    if tuple(tensor.shape) != self.shape(name):  # the file changed since open()
                        raise CheckpointError(
                            f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, "
                            f"expected {self.shape(name)}"
                        )
                    out[name] = tensor.to(dtype)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {file} in {self.model_dir}: {exc}") from None
        return out

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.model_dir)!r}, {len(self._tensors)} tensors)"


def _check_matches(model_dir: Path, tensors: dict[str, TensorInfo],
                   expected: dict[str, tuple[int, ...]]) -> None:
    problems = []
    missing = [f"{n!r} (shape {expected[n]})" for n in expected if n not in tensors]
    unexpected = [f"{n!r} (in {tensors[n].file})" for n in tensors if n not in expected]
    wrong_shape = [
        f"{n!r} in {tensors[n].file} has shape {tensors[n].shape}, expected {expected[n]}"
        for n in expected if n in tensors and tensors[n].shape != expected[n]
    ]
    wrong_dtype = [
        f"{n!r} in {tensors[n].file} is stored as {tensors[n].dtype}, "
        f"not a float type ({'/'.join(FLOAT_DTYPE_TAGS)})"
        for n in expected if n in tensors and tensors[n].dtype not in FLOAT_DTYPE_TAGS
    ]
    for label, items in (("missing tensor", missing), ("unexpected tensor", unexpected),
                         ("wrong shape", wrong_shape), ("wrong dtype", wrong_dtype)):
        if items:
            more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            problems.append(f"{label}{'s' if len(items) > 1 else ''}: {', '.join(items[:_MAX_LISTED])}{more}")
    if problems:
        raise CheckpointError(
            f"checkpoint {model_dir} does not match its config.json: " + "; ".join(problems))


class LoadedCheckpoint(NamedTuple):
    config: ModelConfig
    attention: dict[str, torch.Tensor]
    experts: dict[tuple[int, int], ExpertTensors]


def load_checkpoint(model_dir: str | Path, dtype: str | torch.dtype, *,
                    progress: bool = True) -> LoadedCheckpoint:
    """Everything, for single-process use; workers use `Checkpoint` to read only their share."""
    ckpt = Checkpoint.open(model_dir)
    attention = ckpt.load_attention_weights(dtype, progress)
    experts = ckpt.load_expert_weights(all_expert_pairs(ckpt.config), dtype, progress)
    return LoadedCheckpoint(ckpt.config, attention, experts)

