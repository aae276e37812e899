"""The device decision, the backend choice and GPU memory sizing, as pure functions."""

from __future__ import annotations

import pytest
import torch

from cluster.resource_check import describe_missing, missing_resources
from workers.comm.collective_backend import RankDevice, choose_backend, describe_choice
from workers.device.memory import (
    DeviceMemoryError,
    activation_reserve_bytes,
    check_weights_fit,
    kv_block_bytes,
    num_kv_blocks_for_budget,
)
from workers.device.selection import DeviceError, resolve_device, resolve_dtype
from workers.weights.config import ModelConfig

CPU, CUDA0 = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("requested, cuda_available, assigned, expected", [
    ("cpu", True, ["0"], CPU),  # a CPU group on a GPU node stays on the CPU
    ("cpu", False, None, CPU),
    ("auto", True, ["3"], CUDA0),  # Ray's CUDA_VISIBLE_DEVICES makes its GPU cuda:0
    ("auto", True, [], CPU),  # under Ray with no GPU given: the CPU, even if CUDA looks available
    ("auto", True, None, CUDA0),  # outside Ray: the first visible GPU
    ("auto", False, None, CPU),
    ("cuda", True, ["0"], CUDA0),
    ("cuda", True, None, CUDA0),
])
def test_resolve_device(requested, cuda_available, assigned, expected):
    assert resolve_device(requested, cuda_available=cuda_available, assigned_gpus=assigned) == expected


@pytest.mark.parametrize("cuda_available, assigned, words", [
    (False, None, "sees no CUDA GPU"),
    (True, [], "assigned this process no GPU"),
])
def test_cuda_without_a_gpu_fails_at_start_with_a_reason(cuda_available, assigned, words):
    with pytest.raises(DeviceError, match=words):
        resolve_device("cuda", cuda_available=cuda_available, assigned_gpus=assigned)


def test_unknown_device_is_refused():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu", cuda_available=True, assigned_gpus=None)


def test_dtype_auto_follows_the_device():
    assert resolve_dtype("auto", CUDA0, "bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", CPU, "bfloat16") == torch.float32
    assert resolve_dtype("bf16", CPU, "float32") == torch.bfloat16  # an explicit dtype wins anywhere


def gpu(node: str, uuid: str) -> RankDevice:
    return RankDevice("cuda", node, uuid)


@pytest.mark.parametrize("devices, expected", [
    ([RankDevice("cpu", "n1")] * 3, "gloo"),
    ([gpu("n1", "a"), gpu("n1", "b"), gpu("n2", "a")], "nccl"),  # same UUID on two nodes: two GPUs
    ([gpu("n1", "a"), gpu("n1", "a"), gpu("n1", "b")], "staged"),  # two ranks share GPU a
    ([gpu("n1", "a"), RankDevice("cpu", "n1")], "staged"),  # a CPU rank among GPU ranks
    ([gpu("n1", "a")], "nccl"),
])
def test_backend_follows_the_ranks_devices(devices, expected):
    backend = choose_backend(devices)
    assert backend == expected
    assert backend in describe_choice(devices, backend)


def test_rank_device_is_consistent():
    with pytest.raises(ValueError):
        RankDevice("cuda", "n1")  # a GPU rank names its GPU
    with pytest.raises(ValueError):
        RankDevice("cpu", "n1", "uuid")


MIXTRAL = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                      num_experts_per_tok=2)
GIB = 1 << 30


def test_kv_block_bytes_of_mixtral_in_bf16():
    # 2 (K, V) × 32 layers × 16 tokens × 8 heads × 128 dims × 2 bytes = 2 MiB per block.
    assert kv_block_bytes(MIXTRAL, 16, torch.bfloat16) == 2 * 32 * 16 * 8 * 128 * 2


def test_kv_blocks_are_what_is_left_of_the_share_after_weights_and_reserve():
    block = kv_block_bytes(MIXTRAL, 16, torch.bfloat16)
    blocks = num_kv_blocks_for_budget(total_bytes=80 * GIB, utilization=0.9, gpu_fraction=1.0,
                                      weight_bytes=3 * GIB, reserve_bytes=1 * GIB, block_bytes=block)
    assert blocks == int(80 * GIB * 0.9 - 4 * GIB) // block
    shared = num_kv_blocks_for_budget(total_bytes=80 * GIB, utilization=0.9, gpu_fraction=0.25,
                                      weight_bytes=3 * GIB, reserve_bytes=1 * GIB, block_bytes=block)
    assert shared == int(80 * GIB * 0.9 * 0.25 - 4 * GIB) // block  # a quarter of the GPU, not 90% of it


def test_no_room_for_a_kv_cache_is_an_error_with_the_numbers():
    with pytest.raises(DeviceMemoryError, match="no room for a KV cache.*weights take 90.00 GiB"):
        num_kv_blocks_for_budget(total_bytes=80 * GIB, utilization=0.9, gpu_fraction=1.0,
                                 weight_bytes=90 * GIB, reserve_bytes=GIB, block_bytes=1 << 21)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        num_kv_blocks_for_budget(total_bytes=GIB, utilization=1.5, gpu_fraction=1.0, weight_bytes=0,
                                 reserve_bytes=0, block_bytes=1)


def test_activation_reserve_grows_with_the_step():
    small = activation_reserve_bytes(MIXTRAL, 64, 8, torch.bfloat16)
    large = activation_reserve_bytes(MIXTRAL, 4096, 256, torch.bfloat16)
    assert 512 << 20 < small < large


def test_weights_that_cannot_fit_fail_before_loading():
    with pytest.raises(DeviceMemoryError, match="expert worker rank 2 needs 93.00 GiB"):
        check_weights_fit(weight_bytes=93 * GIB, free_bytes=79 * GIB, total_bytes=80 * GIB,
                          what="expert worker rank 2")
    check_weights_fit(weight_bytes=23 * GIB, free_bytes=79 * GIB, total_bytes=80 * GIB, what="x")


def test_missing_resources_are_named():
    bundles = [{"CPU": 0.25}, {"CPU": 0.25, "GPU": 1.0}, {"CPU": 0.25, "GPU": 1.0, "moe_expert": 1.0}]
    assert missing_resources(bundles, {"CPU": 2.0, "GPU": 1.0}) == {"GPU": (2.0, 1.0),
                                                                     "moe_expert": (1.0, 0.0)}
    assert describe_missing(bundles, {"CPU": 2.0, "GPU": 1.0}) == (
        "GPU: needs 2, the cluster has 1 available; moe_expert: needs 1, the cluster has 0 available")
    assert describe_missing(bundles, {"CPU": 1.0, "GPU": 2.0, "moe_expert": 1.0}) == ""
