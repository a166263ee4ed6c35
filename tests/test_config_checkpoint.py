"""config.json in both styles, and every bad input named by field, file and tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from refs import rewrite_config
from safetensors.torch import load_file, save_file

from mixtral_lite.model.checkpoint import Checkpoint, CheckpointError
from mixtral_lite.model.config import ConfigError, ModelConfig
from mixtral_lite.runtime.load import load_model


@pytest.fixture
def ckpt_copy(mixtral_ref, tmp_path):
    _, src = mixtral_ref
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def test_transformers5_style_config(mixtral_ref):
    _, path = mixtral_ref
    cfg = ModelConfig.from_dir(path)
    assert (cfg.arch, cfg.num_experts, cfg.experts_per_tok, cfg.head_dim) == ("mixtral", 4, 2, 16)
    assert cfg.rope_theta == 1e6 and cfg.dtype == "float32" and cfg.sliding_window is None


def test_real_mixtral_style_config_reads_the_same(mixtral_ref, ckpt_copy):
    rewrite_config(ckpt_copy, rope_parameters=None, dtype=None, rope_theta=1e6, torch_dtype="float32")
    assert ModelConfig.from_dir(ckpt_copy) == ModelConfig.from_dir(mixtral_ref[1])
    rewrite_config(ckpt_copy, rope_theta=5e5, torch_dtype="bfloat16")
    cfg = ModelConfig.from_dir(ckpt_copy)
    assert cfg.rope_theta == 5e5 and cfg.dtype == "bfloat16"


def test_mistral_config(mistral_ref):
    cfg = ModelConfig.from_dir(mistral_ref[1])
    assert cfg.arch == "mistral" and cfg.num_experts == 0 and not cfg.is_moe


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "'architectures'"),
    ({"num_attention_heads": 5}, "'num_attention_heads' (5) does not divide 'hidden_size' (64)"),
    ({"num_key_value_heads": 3}, "'num_key_value_heads' (3) does not divide"),
    ({"num_experts_per_tok": 5}, "'num_experts_per_tok' (5) exceeds 'num_local_experts' (4)"),
    ({"hidden_size": None}, "field 'hidden_size' is missing"),
    ({"vocab_size": -3}, "'vocab_size' must be a positive integer"),
    ({"sliding_window": 0}, "'sliding_window'"),
])
def test_bad_config_names_field_and_file(ckpt_copy, changes, message):
    rewrite_config(ckpt_copy, **changes)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dir(ckpt_copy)
    assert message in str(err.value) and str(ckpt_copy / "config.json") in str(err.value)


def test_missing_config_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(ckpt_copy):
    _edit_tensors(ckpt_copy, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.block_sparse_moe.experts.2.w3.weight' is missing"):
        Checkpoint(ckpt_copy)


def test_extra_tensor(ckpt_copy):
    _edit_tensors(ckpt_copy, lambda t: t.__setitem__("model.layers.9.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.layers.9.bogus.weight'"):
        Checkpoint(ckpt_copy)


def test_wrong_shape(ckpt_copy):
    _edit_tensors(ckpt_copy, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 64)))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\)"):
        Checkpoint(ckpt_copy)


def test_truncated_file(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(ckpt_copy)


def test_sharded_checkpoint_and_missing_shard(mixtral_ref, tmp_path):
    hf, _ = mixtral_ref
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="1MB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    x = torch.randint(3, 32000, (1, 12))
    with torch.no_grad():
        assert (load_model(path)(x) - hf(x).logits).abs().max() <= 1e-4
    (path / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1]}: shard is missing"):
        load_model(path)


def test_no_weights_at_all(tmp_path, mixtral_ref):
    shutil.copy(mixtral_ref[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_model(tmp_path)


def test_dtype_cast_on_load(mixtral_ref):
    model = load_model(mixtral_ref[1], dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16 and model.experts.w13[0].dtype == torch.bfloat16
