"""Tiny random checkpoints written by transformers (the reference), for the tests."""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path

import torch

TOKENIZER = Path(str(files("mistral_common") / "data" / "tokenizer.model.v1"))

TINY = dict(vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def save_reference(path: Path, arch: str = "mixtral", seed: int = 0, **overrides):
    """Build a random transformers model, save it with its tokenizer, return (model, path)."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    kw = TINY | overrides
    if arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw))
    else:
        model = MistralForCausalLM(MistralConfig(**kw))
    model.eval()
    model.save_pretrained(path)
    shutil.copy(TOKENIZER, path / "tokenizer.model")
    return model, path


def rewrite_config(path: Path, **changes) -> None:
    """Edit config.json in place (None deletes a key)."""
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))
