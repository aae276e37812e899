"""Model configuration: the Mixtral fields of a HuggingFace `config.json`.

One frozen dataclass, validated when built. Unknown `model_type`s and unsupported values
fail here with a message naming the field, so nothing downstream has to guess.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("mixtral",)
SUPPORTED_HIDDEN_ACTS = ("silu",)


class ConfigError(ValueError):
    """A config.json we cannot serve, with the offending field in the message."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    head_dim: int | None = None  # HF default: hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "num_local_experts",
            "num_experts_per_tok", "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads}) and no head_dim is given"
            )
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"config field 'head_dim' must be positive, got {self.head_dim!r}")
        if self.head_dim_ % 2:
            raise ConfigError(f"head_dim ({self.head_dim_}) must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window!r}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def head_dim_(self) -> int:
        """The per-head width actually used (HF falls back to hidden/heads)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}: moe-serve serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = raw.get("hidden_act", "silu")
        if act not in SUPPORTED_HIDDEN_ACTS:
            raise ConfigError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU) is implemented")
        scaling = raw.get("rope_scaling")
        if scaling:
            raise ConfigError(f"rope_scaling {scaling!r} is not supported")
        # transformers >= 4.5x may nest rope_theta under rope_parameters.
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type {rope.get('rope_type')!r} is not supported")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        if "rope_theta" not in kwargs and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        if "dtype" in raw and "torch_dtype" not in raw:
            kwargs["torch_dtype"] = raw["dtype"]
        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_local_experts", "num_experts_per_tok")
                   if n not in kwargs]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        if kwargs.get("torch_dtype") is None:
            kwargs["torch_dtype"] = "float32"
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a field of the wrong JSON type
            raise ConfigError(f"bad config.json: {exc}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config.json is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The dict `transformers.MixtralConfig(**d)` accepts (and config.json holds)."""
        out = asdict(self)
        out.update(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_act="silu",
                   router_aux_loss_coef=0.0, output_router_logits=False, attention_dropout=0.0,
                   initializer_range=0.02, use_cache=True)
        if self.head_dim is None:
            out.pop("head_dim")
        return out
