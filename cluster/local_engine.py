"""Build the single-process engine: the whole model in this process, local dispatcher."""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.engine import Engine
from cluster.engine_config import EngineConfig
from cluster.executor import LocalExecutor
from cluster.text_io import load_text_io
from workers.kv_cache import KVCache
from workers.model_loader import load_local_model
from workers.model_runner import ModelRunner


def build_local_engine(model_dir: str | Path, config: EngineConfig | None = None,
                       dtype: torch.dtype = torch.float32, progress: bool = False) -> Engine:
    config = config or EngineConfig()
    if config.num_attention_workers != 1:
        raise ValueError("the single-process engine has exactly one attention worker")
    model = load_local_model(model_dir, dtype, progress=progress)
    kv_cache = KVCache(model.cfg, config.num_kv_blocks, config.block_size, dtype=dtype)
    tokenizer, eos = load_text_io(model_dir, model.cfg)
    return Engine(LocalExecutor(ModelRunner(model, kv_cache)), config,
                  max_model_len=model.cfg.max_position_embeddings, eos_token_ids=eos, tokenizer=tokenizer)
