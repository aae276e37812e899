"""Dtype names as users, CLIs and `config.json` spell them, parsed into `torch.dtype`s.

Only the three float types a serving path computes in are accepted; anything else fails
here with the list of accepted names, so no caller has to guess what "half" meant.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_CANONICAL = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class DtypeError(ValueError):
    """A dtype name or value we do not serve in."""


def parse_dtype(value: str | torch.dtype, *, auto: str | torch.dtype | None = None) -> torch.dtype:
    """"bf16" → torch.bfloat16, and so on. "auto" means `auto` (usually the checkpoint's
    `torch_dtype`); without one, "auto" is an error rather than a silent float32."""
    if isinstance(value, torch.dtype):
        if value not in SUPPORTED_DTYPES:
            raise DtypeError(f"unsupported dtype {value}: use one of {', '.join(_NAMES)}")
        return value
    if not isinstance(value, str):
        raise DtypeError(f"dtype must be a string or torch.dtype, got {type(value).__name__} {value!r}")
    key = value.strip().lower().removeprefix("torch.")
    if key == "auto":
        if auto is None:
            raise DtypeError("dtype 'auto' needs a default (the checkpoint's torch_dtype) to resolve to")
        return parse_dtype(auto)
    if key not in _NAMES:
        raise DtypeError(f"unknown dtype {value!r}: use one of {', '.join(_NAMES)} or 'auto'")
    return _NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name ("bfloat16") of a supported dtype, as config.json writes it."""
    return _CANONICAL[parse_dtype(dtype)]
