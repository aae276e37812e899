"""Where each tensor of a safetensors checkpoint lives, read from the file headers only.

A checkpoint directory holds either one `model.safetensors` or shards listed by
`model.safetensors.index.json` (its `weight_map`: tensor name → shard file). Opening a
safetensors file parses only its JSON header, so indexing a 90 GB checkpoint reads a few
kilobytes. Every inconsistency between the index and the shards is a `CheckpointError`
naming the file and the tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype tags we can cast to a serving dtype; ints or fp8 mean a format we do not read.
FLOAT_DTYPE_TAGS = ("F64", "F32", "BF16", "F16")


class CheckpointError(ValueError):
    """A checkpoint we cannot load, with the offending tensor or file in the message."""


@dataclass(frozen=True)
class TensorInfo:
    file: str  # path relative to the checkpoint directory
    shape: tuple[int, ...]
    dtype: str  # safetensors tag: "F32", "BF16", ...


def index_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Name → TensorInfo for every tensor. Like transformers, a single `model.safetensors`
    wins over an index when both are present."""
    if (model_dir / SINGLE_FILE).is_file():
        return read_header(model_dir, SINGLE_FILE)
    if (model_dir / INDEX_FILE).is_file():
        return _index_shards(model_dir, read_weight_map(model_dir))
    hint = ""
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        hint = " (found PyTorch .bin/.pt weights: convert them to safetensors)"
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}{hint}")


def read_header(model_dir: Path, file: str) -> dict[str, TensorInfo]:
    """Shapes and dtypes of one file's tensors. safetensors checks on open that the header
    is well formed and the data covers it exactly, so truncation is caught here."""
    try:
        with safe_open(model_dir / file, framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                tensor = f.get_slice(name)
                out[name] = TensorInfo(file, tuple(tensor.get_shape()), tensor.get_dtype())
            return out
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read safetensors file {file} in {model_dir}: {exc}") from None


def read_weight_map(model_dir: Path) -> dict[str, str]:
    try:
        raw = json.loads((model_dir / INDEX_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {INDEX_FILE} in {model_dir}: {exc}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{INDEX_FILE} in {model_dir} has no 'weight_map' object")
    root = model_dir.resolve()
    for name, file in weight_map.items():
        if not isinstance(file, str) or not (model_dir / file).resolve().is_relative_to(root):
            raise CheckpointError(
                f"{INDEX_FILE} maps tensor {name!r} to {file!r}, not a file inside {model_dir}")
    return weight_map


def _index_shards(model_dir: Path, weight_map: dict[str, str]) -> dict[str, TensorInfo]:
    files = sorted(set(weight_map.values()))
    for file in files:
        if not (model_dir / file).is_file():
            example = next(n for n, f in weight_map.items() if f == file)
            raise CheckpointError(
                f"{INDEX_FILE} references shard file {file}, which is missing from {model_dir} "
                f"(it should hold {example!r})"
            )
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(model_dir, file).items():
            claimed = weight_map.get(name)
            if claimed != file:
                where = "does not list it" if claimed is None else f"maps it to {claimed}"
                raise CheckpointError(f"shard {file} holds tensor {name!r}, but {INDEX_FILE} {where}")
            tensors[name] = info
    for name, file in weight_map.items():
        if name not in tensors:
            raise CheckpointError(
                f"{INDEX_FILE} maps tensor {name!r} to shard {file}, which does not contain it")
    return tensors
