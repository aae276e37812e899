"""Turning decode CUDA graphs off (--enforce-eager) and where they are on, without a GPU."""

from __future__ import annotations

import torch

from cluster.engine_config import EngineConfig
from cluster.local_engine import build_local_engine
from gateway.app import ServeOptions
from gateway.cli import build_parser
from workers.model.cuda_graph_capture import use_decode_graphs


def test_enforce_eager_flag_reaches_the_engine_config():
    parse = build_parser().parse_args
    assert parse(["serve"]).enforce_eager is False
    assert parse(["serve", "--enforce-eager"]).enforce_eager is True
    assert ServeOptions(model_dir="/nonexistent/demo").engine_options().engine.enforce_eager is False
    eager = ServeOptions(model_dir="/nonexistent/demo", enforce_eager=True)
    assert eager.engine_options().engine.enforce_eager is True


def test_graphs_only_on_cuda_and_only_when_not_enforced_eager():
    assert not use_decode_graphs(torch.device("cpu"), enforce_eager=False)
    assert not use_decode_graphs(torch.device("cuda", 0), enforce_eager=True)  # decided before asking Triton


def test_the_cpu_engine_is_unchanged(demo_model_dir):
    engine = build_local_engine(demo_model_dir, EngineConfig(num_kv_blocks=32, block_size=4), device="cpu")
    runner = engine.executor.runner
    assert runner.decode_graphs is None
    assert runner.kv_cache.num_blocks == 32  # no scratch block
