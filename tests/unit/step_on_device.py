"""One prefill step and one decode step of the demo model on a device, under a DeviceAudit."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.device_audit import DeviceAudit
from workers.model.batch_spec import ScheduledBatch, ScheduledSeq
from workers.model.kv_cache import KVCache
from workers.model.loader import load_local_model
from workers.model.runner import ModelRunner
from workers.model.sampling_params import SamplingParams

BLOCK_SIZE = 4


def run_one_step(model_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> DeviceAudit:
    """Prefill two sequences (outside the audit), then audit one decode step of both."""
    model = load_local_model(model_dir, dtype, device)
    runner = ModelRunner(model, KVCache(model.cfg, 16, BLOCK_SIZE, dtype=dtype, device=device))
    greedy, sampled = SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9,
                                                                   seed=7)
    prompts = ([5, 6, 7, 8, 9], [10, 11, 12])
    tables = ((0, 1, 2), (3, 4))
    first = runner.execute(ScheduledBatch(tuple(
        ScheduledSeq(i, tuple(p), 0, t, True, sp, 0)
        for i, (p, t, sp) in enumerate(zip(prompts, tables, (greedy, sampled), strict=True)))))
    decode = ScheduledBatch(tuple(
        ScheduledSeq(i, (first.token_ids[i],), len(p), t, True, sp, 1)
        for i, (p, t, sp) in enumerate(zip(prompts, tables, (greedy, sampled), strict=True))))
    with DeviceAudit() as audit:
        runner.execute(decode)
    return audit
