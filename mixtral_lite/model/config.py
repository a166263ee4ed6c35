"""`ModelConfig`: the checkpoint's config.json, read once and validated."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "MistralForCausalLM": "mistral"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A config.json that mixtral-lite cannot run; the message names the field and the file."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "mixtral" or "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    sliding_window: int | None  # None: full attention (Mixtral-8x7B itself)
    max_position_embeddings: int
    num_experts: int  # 0 for the dense Mistral MLP
    experts_per_tok: int
    tie_word_embeddings: bool
    dtype: str  # the checkpoint's own dtype name
    bos_id: int | None = 1
    eos_id: int | None = 2

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @staticmethod
    def from_dir(path: str | Path) -> ModelConfig:
        return ModelConfig.from_file(Path(path) / "config.json")

    @staticmethod
    def from_file(path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json (is this a model folder?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        return ModelConfig.from_dict(raw, str(path))

    @staticmethod
    def from_dict(raw: dict, source: str = "config.json") -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: must hold a JSON object {{...}}, got a JSON {type(raw).__name__}")
        arch = _architecture(raw, source)

        def need(key: str, kind=int):
            if raw.get(key) is None:
                raise ConfigError(f"{source}: field {key!r} is missing")
            value = raw[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = need("num_key_value_heads") if raw.get("num_key_value_heads") is not None else heads
        head_dim = need("head_dim") if raw.get("head_dim") is not None else hidden // heads
        if raw.get("head_dim") is None and hidden % heads:
            raise ConfigError(f"{source}: field 'num_attention_heads' ({heads}) does not divide "
                              f"'hidden_size' ({hidden})")
        if heads % kv_heads:
            raise ConfigError(f"{source}: field 'num_key_value_heads' ({kv_heads}) does not divide "
                              f"'num_attention_heads' ({heads})")
        num_experts = need("num_local_experts") if arch == "mixtral" else 0
        top_k = need("num_experts_per_tok") if arch == "mixtral" else 0
        if top_k > num_experts:
            raise ConfigError(f"{source}: field 'num_experts_per_tok' ({top_k}) exceeds "
                              f"'num_local_experts' ({num_experts})")
        window = raw.get("sliding_window")
        if window is not None and (not isinstance(window, int) or window <= 0):
            raise ConfigError(f"{source}: field 'sliding_window' must be null or a positive integer")
        max_pos = need("max_position_embeddings") if raw.get("max_position_embeddings") is not None else 32768
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if dtype not in DTYPES:
            raise ConfigError(f"{source}: field 'torch_dtype' {dtype!r} is not one of {sorted(DTYPES)}")
        return ModelConfig(
            arch=arch, vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rope_theta=_positive(_rope_theta(raw, source), "rope_theta", source),
            rms_norm_eps=_positive(raw.get("rms_norm_eps", 1e-5), "rms_norm_eps", source),
            sliding_window=window, max_position_embeddings=max_pos,
            num_experts=num_experts, experts_per_tok=top_k,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), dtype=dtype,
            bos_id=raw.get("bos_token_id", 1), eos_id=_first(raw.get("eos_token_id", 2)),
        )


def _positive(value, key: str, source: str) -> float:
    """A finite number > 0 (rms_norm_eps -1 or rope_theta 0 would make every logit NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source}: field {key!r} must be a finite number > 0, got {value!r}")
    return float(value)


def _architecture(raw: dict, source: str) -> str:
    names = raw.get("architectures") or []
    if not isinstance(names, list):
        raise ConfigError(f"{source}: field 'architectures' must be a list such as [\"MixtralForCausalLM\"], "
                          f"got {names!r}")
    known = [ARCHITECTURES[n] for n in names if n in ARCHITECTURES]
    if known:
        return known[0]
    if not names and raw.get("model_type") in ("mixtral", "mistral"):
        return raw["model_type"]
    raise ConfigError(f"{source}: field 'architectures' {names!r} is not supported; "
                      f"expected one of {sorted(ARCHITECTURES)}")


def _rope_theta(raw: dict, source: str) -> float:
    """Real Mixtral checkpoints write a top-level rope_theta; transformers 5 nests it."""
    if raw.get("rope_theta") is not None:
        return raw["rope_theta"]
    params = raw.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: field 'rope_parameters.rope_type' {params['rope_type']!r} "
                          "is not supported (only default RoPE)")
    if params.get("rope_theta") is not None:
        return params["rope_theta"]
    return 1e6 if raw.get("model_type") == "mixtral" else 1e4


def _first(value):
    return value[0] if isinstance(value, list) else value
