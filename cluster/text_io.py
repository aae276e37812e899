"""The tokenizer and stop ids an engine uses, read from the checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from cluster.tokenizer import Tokenizer
from workers.weights.config import ModelConfig


def load_text_io(model_dir: str | Path, cfg: ModelConfig) -> tuple[Tokenizer | None, tuple[int, ...]]:
    """(tokenizer or None when the checkpoint has no tokenizer.json, EOS ids)."""
    if (Path(model_dir) / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_dir(model_dir)
        return tokenizer, tokenizer.eos_token_ids
    return None, ((cfg.eos_token_id,) if cfg.eos_token_id is not None else ())
