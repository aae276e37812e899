"""The checkpoint loader against checkpoints written by transformers and by hand."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.unit.checkpoint_factory import (
    hf_expert_weights,
    make_hf_checkpoint,
    make_hf_model,
    random_tensors,
    read_checkpoint_files,
    write_checkpoint,
)
from workers.weights.checkpoint import (
    Checkpoint,
    CheckpointError,
    ExpertTensors,
    load_checkpoint,
)
from workers.weights.config import ConfigError, ModelConfig
from workers.weights.dtypes import DtypeError, dtype_name, parse_dtype
from workers.weights.weight_names import (
    all_expert_pairs,
    attention_weight_shapes,
    checkpoint_shapes,
    expert_weight_name,
)

SMALL = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf_sharded"), sharded=True)


@pytest.fixture
def small_tensors() -> dict[str, torch.Tensor]:
    return random_tensors(SMALL)


def open_error(model_dir: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(model_dir)
    return str(info.value)


# --- checkpoints written by transformers -------------------------------------------------

def test_hf_saves_exactly_the_names_we_expect(hf_dir: Path) -> None:
    cfg = ModelConfig.from_dir(hf_dir)
    names = set(read_checkpoint_files(hf_dir))
    assert names == set(checkpoint_shapes(cfg))
    assert expert_weight_name(1, 3, "w2") in names  # the legacy per-expert layout


def test_open_exposes_config_names_and_shapes(hf_dir: Path) -> None:
    ckpt = Checkpoint.open(str(hf_dir))
    cfg = ckpt.config
    assert (cfg.hidden_size, cfg.num_local_experts, cfg.num_hidden_layers) == (16, 4, 2)
    assert ckpt.model_dir == hf_dir
    assert set(ckpt.tensor_names) == set(checkpoint_shapes(cfg))
    assert ckpt.shape(expert_weight_name(0, 0, "w2")) == (16, 32)
    assert ckpt.shape("model.embed_tokens.weight") == (64, 16)
    assert ckpt.stored_dtype_tag("model.norm.weight") == "F32"
    assert ckpt.tensors_read == set()  # open() reads headers only


def test_load_everything_equals_the_files(hf_dir: Path) -> None:
    reference = read_checkpoint_files(hf_dir)
    config, attention, experts = load_checkpoint(hf_dir, "float32", progress=False)
    assert set(attention) == set(attention_weight_shapes(config))
    for name, tensor in attention.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name
    assert set(experts) == set(all_expert_pairs(config))
    for (layer, expert), weights in experts.items():
        for proj in ("w1", "w2", "w3"):
            assert torch.equal(getattr(weights, proj), reference[expert_weight_name(layer, expert, proj)])


def test_expert_weights_equal_the_in_memory_hf_model(hf_dir: Path) -> None:
    model = make_hf_model(seed=0)  # same seed as the saved checkpoint
    experts = Checkpoint.open(hf_dir).load_expert_weights(
        all_expert_pairs(ModelConfig.from_dir(hf_dir)), "fp32")
    for (layer, expert), weights in experts.items():
        oracle = hf_expert_weights(model, layer, expert)
        assert weights.w1.shape == (32, 16) and weights.w2.shape == (16, 32)
        for proj in ("w1", "w2", "w3"):
            assert torch.equal(getattr(weights, proj), oracle[proj]), (layer, expert, proj)
    attention = Checkpoint.open(hf_dir).load_attention_weights("fp32")
    assert torch.equal(attention["model.layers.1.block_sparse_moe.gate.weight"],
                       model.model.layers[1].mlp.gate.weight)
    assert torch.equal(attention["lm_head.weight"], model.lm_head.weight)


@pytest.mark.parametrize("pairs", [[(0, 1), (1, 3)], [(1, 0), (1, 0), (0, 2)]])
def test_subset_load_reads_only_those_experts(hf_sharded_dir: Path, pairs: list[tuple[int, int]]) -> None:
    reference = read_checkpoint_files(hf_sharded_dir)
    ckpt = Checkpoint.open(hf_sharded_dir)
    experts = ckpt.load_expert_weights(pairs, torch.float32, progress=False)
    wanted = {expert_weight_name(l, e, p) for l, e in pairs for p in ("w1", "w2", "w3")}
    assert len(wanted) == 6
    assert ckpt.tensors_read == wanted
    assert list(experts) == list(dict.fromkeys(pairs))
    for (layer, expert), weights in experts.items():
        assert isinstance(weights, ExpertTensors)
        assert torch.equal(weights.w3, reference[expert_weight_name(layer, expert, "w3")])


def test_attention_load_reads_no_expert(hf_sharded_dir: Path) -> None:
    ckpt = Checkpoint.open(hf_sharded_dir)
    ckpt.load_attention_weights("fp32", progress=False)
    assert ckpt.tensors_read == set(attention_weight_shapes(ckpt.config))


def test_sharded_equals_unsharded(hf_dir: Path, hf_sharded_dir: Path) -> None:
    assert len(list(hf_sharded_dir.glob("model-*-of-*.safetensors"))) > 1
    assert not (hf_sharded_dir / "model.safetensors").exists()
    _, attn_a, experts_a = load_checkpoint(hf_dir, "fp32", progress=False)
    _, attn_b, experts_b = load_checkpoint(hf_sharded_dir, "fp32", progress=True)
    assert attn_a.keys() == attn_b.keys() and experts_a.keys() == experts_b.keys()
    assert all(torch.equal(attn_a[n], attn_b[n]) for n in attn_a)
    assert all(torch.equal(experts_a[k].w2, experts_b[k].w2) for k in experts_a)


@pytest.mark.parametrize("dtype, expected", [
    ("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32),
    ("auto", torch.float32),
])
def test_load_casts_to_dtype(hf_dir: Path, dtype: str | torch.dtype, expected: torch.dtype) -> None:
    name = expert_weight_name(0, 2, "w1")
    ckpt = Checkpoint.open(hf_dir)
    (tensor,) = ckpt.load([name], dtype, progress=False).values()
    assert tensor.dtype == expected
    assert torch.equal(tensor, read_checkpoint_files(hf_dir)[name].to(expected))


def test_bf16_checkpoint_loads_as_fp32(tmp_path: Path) -> None:
    tensors = random_tensors(SMALL, dtype=torch.bfloat16)
    ckpt = Checkpoint.open(write_checkpoint(tmp_path, SMALL, tensors, num_shards=3))
    name = "model.layers.1.self_attn.o_proj.weight"
    assert ckpt.stored_dtype_tag(name) == "BF16"
    assert torch.equal(ckpt.load([name], "fp32")[name], tensors[name].float())


def test_tied_embeddings_use_the_embedding_as_lm_head(tmp_path: Path) -> None:
    model_dir = make_hf_checkpoint(tmp_path, tie_word_embeddings=True)
    assert "lm_head.weight" not in read_checkpoint_files(model_dir)
    attention = Checkpoint.open(model_dir).load_attention_weights("fp32", progress=False)
    assert attention["lm_head.weight"] is attention["model.embed_tokens.weight"]


def test_tied_checkpoint_that_still_stores_lm_head_is_accepted(tmp_path: Path) -> None:
    cfg = replace(SMALL, tie_word_embeddings=True)
    tensors = random_tensors(cfg)
    tensors["lm_head.weight"] = torch.randn(32, 8)
    ckpt = Checkpoint.open(write_checkpoint(tmp_path, cfg, tensors))
    assert "lm_head.weight" not in ckpt.tensor_names
    attention = ckpt.load_attention_weights("fp32", progress=False)
    assert torch.equal(attention["lm_head.weight"], tensors["model.embed_tokens.weight"])


# --- what goes wrong, and what the message says ------------------------------------------

def test_missing_tensor_is_named(tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    del small_tensors[expert_weight_name(1, 2, "w3")]
    message = open_error(write_checkpoint(tmp_path, SMALL, small_tensors))
    assert "missing tensor" in message and expert_weight_name(1, 2, "w3") in message


def test_unexpected_tensor_is_named(tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    small_tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(2)
    message = open_error(write_checkpoint(tmp_path, SMALL, small_tensors, num_shards=2))
    assert "unexpected tensor" in message and "rotary_emb.inv_freq" in message


def test_wrong_shape_is_named(tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    small_tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 8)
    message = open_error(write_checkpoint(tmp_path, SMALL, small_tensors))
    assert "model.layers.0.self_attn.k_proj.weight" in message and "(5, 8)" in message and "(4, 8)" in message


def test_extra_experts_from_a_different_config_are_reported(tmp_path: Path) -> None:
    bigger = replace(SMALL, num_local_experts=4)
    message = open_error(write_checkpoint(tmp_path, SMALL, random_tensors(bigger)))
    assert expert_weight_name(0, 3, "w1") in message and "gate.weight" in message


def test_integer_tensor_is_rejected(tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    small_tensors["model.norm.weight"] = torch.ones(8, dtype=torch.int64)
    message = open_error(write_checkpoint(tmp_path, SMALL, small_tensors))
    assert "model.norm.weight" in message and "I64" in message


def test_index_pointing_to_a_missing_shard(tmp_path: Path) -> None:
    model_dir = write_checkpoint(tmp_path, SMALL, random_tensors(SMALL), num_shards=3)
    (model_dir / "model-00002-of-00003.safetensors").unlink()
    message = open_error(model_dir)
    assert "model-00002-of-00003.safetensors" in message and "missing" in message


def test_shard_without_what_the_index_claims(tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    model_dir = write_checkpoint(tmp_path, SMALL, small_tensors, num_shards=2)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.self_attn.ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    message = open_error(model_dir)
    assert ("model.layers.0.self_attn.ghost.weight" in message
            and "model-00001-of-00002.safetensors" in message)


def test_index_and_shard_disagree_on_a_tensor(tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    model_dir = write_checkpoint(tmp_path, SMALL, small_tensors, num_shards=2)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(n for n, f in index["weight_map"].items() if f == "model-00001-of-00002.safetensors")
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    message = open_error(model_dir)
    assert name in message and "model-00001-of-00002.safetensors" in message


def test_index_escaping_the_directory_is_rejected(
        tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    model_dir = write_checkpoint(tmp_path / "ckpt", SMALL, small_tensors, num_shards=2)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    assert "../elsewhere.safetensors" in open_error(model_dir)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"weight_map": {}}'])
def test_bad_index_file(tmp_path: Path, small_tensors: dict[str, torch.Tensor], content: str) -> None:
    model_dir = write_checkpoint(tmp_path, SMALL, small_tensors, num_shards=2)
    (model_dir / "model.safetensors.index.json").write_text(content)
    assert "model.safetensors.index.json" in open_error(model_dir)


@pytest.mark.parametrize("keep", [0, 5, 40, -16])
def test_truncated_file(tmp_path: Path, small_tensors: dict[str, torch.Tensor], keep: int) -> None:
    model_dir = write_checkpoint(tmp_path, SMALL, small_tensors, num_shards=2)
    shard = model_dir / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:keep])
    message = open_error(model_dir)
    assert "model-00002-of-00002.safetensors" in message


def test_corrupted_header(tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    model_dir = write_checkpoint(tmp_path, SMALL, small_tensors)
    data = bytearray((model_dir / "model.safetensors").read_bytes())
    data[8:20] = b"#garbage####"
    (model_dir / "model.safetensors").write_bytes(bytes(data))
    assert "model.safetensors" in open_error(model_dir)


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    message = open_error(tmp_path)
    assert "model.safetensors" in message and ".bin" in message


def test_missing_directory(tmp_path: Path) -> None:
    assert "nope" in open_error(tmp_path / "nope")


def test_wrong_model_type(tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    model_dir = write_checkpoint(tmp_path, {**SMALL.to_hf_dict(), "model_type": "llama"}, small_tensors)
    with pytest.raises(ConfigError, match="llama"):
        Checkpoint.open(model_dir)


def test_missing_config(tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    (write_checkpoint(tmp_path, SMALL, small_tensors) / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        Checkpoint.open(tmp_path)


def test_load_rejects_unknown_names_and_pairs_before_reading(hf_dir: Path) -> None:
    ckpt = Checkpoint.open(hf_dir)
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.weight"):
        ckpt.load(["model.norm.weight", "model.layers.9.mlp.weight"], "fp32")
    with pytest.raises(CheckpointError, match=r"\(2, 0\)"):
        ckpt.load_expert_weights([(0, 0), (2, 0)], "fp32")
    with pytest.raises(DtypeError, match="int8"):
        ckpt.load(["model.norm.weight"], "int8")
    assert ckpt.tensors_read == set()


def test_file_truncated_after_open_is_reported_on_load(
        tmp_path: Path, small_tensors: dict[str, torch.Tensor]) -> None:
    model_dir = write_checkpoint(tmp_path, SMALL, small_tensors, num_shards=2)
    ckpt = Checkpoint.open(model_dir)
    shard = model_dir / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        ckpt.load_attention_weights("fp32", progress=False)


# --- dtype names -------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("float32", torch.float32), ("fp32", torch.float32), ("FP32", torch.float32),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("float16", torch.float16), ("fp16", torch.float16), (torch.float16, torch.float16),
])
def test_parse_dtype(name: str | torch.dtype, expected: torch.dtype) -> None:
    assert parse_dtype(name) is expected


def test_parse_dtype_auto_and_errors() -> None:
    assert parse_dtype("auto", auto="bfloat16") is torch.bfloat16
    assert parse_dtype("auto", auto=torch.float16) is torch.float16
    with pytest.raises(DtypeError, match="auto"):
        parse_dtype("auto")
    for bad in ("float64", "int8", "", torch.float64):
        with pytest.raises(DtypeError, match="bf16"):  # the message lists what is accepted
            parse_dtype(bad)
    with pytest.raises(DtypeError, match="int"):
        parse_dtype(16)  # type: ignore[arg-type]
    assert dtype_name(torch.bfloat16) == "bfloat16" and dtype_name("fp16") == "float16"
