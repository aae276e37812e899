"""Build the single-process engine: the whole model in this process, local dispatcher."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from cluster.engine import Engine
from cluster.engine_config import EngineConfig
from cluster.executor import LocalExecutor
from cluster.text_io import load_text_io
from workers.device.memory import MemoryReport, ensure_weights_fit
from workers.device.selection import resolve_dtype, select_device
from workers.model.cuda_graph_capture import capture_decode_graphs, use_decode_graphs
from workers.model.kv_cache import KVCache
from workers.model.kv_cache_sizing import decide_num_kv_blocks
from workers.model.loader import load_local_model, local_weight_bytes
from workers.model.runner import ModelRunner
from workers.weights.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def build_local_engine(model_dir: str | Path, config: EngineConfig | None = None,
                       dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                       progress: bool = False, gpu_fraction: float = 1.0,
                       checkpoint: Checkpoint | None = None) -> Engine:
    """`device` is decided here, once, for the whole process ("auto": a GPU when this process
    has one); `dtype` "auto" follows it (workers/device/selection.py). `checkpoint`: model_dir already
    opened by the caller (an engine replica reads its config once); None opens it here."""
    config = config or EngineConfig()
    if config.num_attention_workers != 1:
        raise ValueError("the single-process engine has exactly one attention worker")
    device = device if isinstance(device, torch.device) else select_device(device)
    ckpt = checkpoint or Checkpoint.open(model_dir)
    cfg = ckpt.config
    dtype = resolve_dtype(dtype, device, cfg.torch_dtype)
    weight_bytes = local_weight_bytes(ckpt, dtype)
    ensure_weights_fit(device, weight_bytes, "the model")
    model = load_local_model(model_dir, dtype, device, progress=progress, checkpoint=ckpt)
    cache = config.cache_config()
    num_blocks = decide_num_kv_blocks(cache, cfg, dtype, device, weight_bytes=weight_bytes,
                                      gpu_fraction=gpu_fraction)
    graphs = use_decode_graphs(device, config.enforce_eager)
    # With decode graphs, one block past those the scheduler hands out: where padding rows write.
    kv_cache = KVCache(cfg, num_blocks + 1 if graphs else num_blocks, cache.block_size, dtype=dtype,
                       device=device)
    memory = MemoryReport(str(device), str(dtype).removeprefix("torch."), weight_bytes, num_blocks,
                          cache.block_size, kv_cache.nbytes)
    log.info("single-process engine on %s", memory.summary())
    tokenizer, eos = load_text_io(model_dir, cfg)
    config = dataclasses.replace(config, num_kv_blocks=num_blocks)
    decode_graphs = (capture_decode_graphs(model, kv_cache, scratch_block=num_blocks,
                                           max_num_seqs=config.max_num_seqs) if graphs else None)
    return Engine(LocalExecutor(ModelRunner(model, kv_cache, decode_graphs)), config,
                  max_model_len=cfg.max_position_embeddings, eos_token_ids=eos, tokenizer=tokenizer,
                  memory=(memory,))
