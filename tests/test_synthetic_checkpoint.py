"""tools/make_synthetic_checkpoint.py: the checkpoints load in transformers with the promised shapes."""

import importlib.resources
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_checkpoint.py"
_spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", TOOL)
msc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = msc  # dataclasses look their module up there
_spec.loader.exec_module(msc)


def read_all(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "tiny"
    msc.main([str(out), "--preset", "tiny", "--seed", "3"])
    return out


def test_tiny_loads_in_transformers_with_promised_shapes(tiny):
    from transformers import MixtralForCausalLM

    model, info = MixtralForCausalLM.from_pretrained(tiny, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (32000, 64, 128, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.num_local_experts, c.num_experts_per_tok) == (4, 2, 4, 2)
    layer = model.model.layers[1]
    assert layer.self_attn.q_proj.weight.shape == (64, 64)
    assert layer.self_attn.k_proj.weight.shape == (2 * 16, 64)  # head_dim 16 = 64 / 4
    # transformers fuses the experts on load: gate_up_proj[e] = cat(w1, w3); it must hold *our* tensors
    raw = read_all(tiny)
    w1, w2, w3 = (raw[f"model.layers.1.block_sparse_moe.experts.3.{w}.weight"].float() for w in ("w1", "w2", "w3"))
    assert torch.equal(layer.mlp.experts.gate_up_proj[3], torch.cat([w1, w3]))
    assert torch.equal(layer.mlp.experts.down_proj[3], w2)
    logits = model(torch.tensor([[1, 22557, 1117]])).logits
    assert torch.isfinite(logits).all() and 0.01 < logits.std() < 10


def test_config_is_real_mixtral_style_and_weights_are_scaled(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["rope_theta"] == 1e6 and cfg["torch_dtype"] == "bfloat16" and cfg["sliding_window"] is None
    assert cfg["architectures"] == ["MixtralForCausalLM"] and "rope_parameters" not in cfg
    real = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    assert (tiny / "tokenizer.model").read_bytes() == real.read_bytes()
    raw = read_all(tiny)
    assert all(t.dtype == torch.bfloat16 for t in raw.values())
    assert torch.equal(raw["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    std = raw["model.layers.0.block_sparse_moe.experts.0.w2.weight"].float().std().item()
    assert 0.018 < std < 0.022


def test_mixtral_lite_reads_it(tiny):
    from mixtral_lite.model.checkpoint import Checkpoint

    ckpt = Checkpoint(tiny)
    assert set(ckpt.names()) == set(read_all(tiny))


def test_sharding_and_seed(tmp_path):
    """Shards + index hold the same tensors as one file for the same seed; another seed differs."""
    single = msc.write_checkpoint(tmp_path / "a", "tiny", seed=5, dtype="float32")
    sharded = msc.write_checkpoint(tmp_path / "b", "tiny", seed=5, dtype="float32", max_shard_bytes=3_000_000)
    other = msc.write_checkpoint(tmp_path / "c", "tiny", seed=6, dtype="float32")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    a, b, c = read_all(single), read_all(sharded), read_all(other)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in a.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_mixtral_eighth_matches_transformers_shapes():
    """The docstring's promise: Mixtral-8x7B's depth and experts at 1/8 width, head_dim 128."""
    from transformers import MixtralConfig, MixtralForCausalLM

    p = msc.PRESETS["mixtral-1/8"]
    cfg = msc.hf_config(p, "bfloat16")
    assert (cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (32, 8, 2)
    assert (cfg["hidden_size"], cfg["intermediate_size"]) == (4096 // 8, 14336 // 8)
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 128 and cfg["num_key_value_heads"] == 1
    specs = {s.name: s.shape for s in msc.tensor_specs(p)}
    assert specs["model.layers.31.self_attn.k_proj.weight"] == (128, 512)
    assert specs["model.layers.31.block_sparse_moe.experts.7.w2.weight"] == (512, 1792)
    with torch.device("meta"):
        ref = MixtralForCausalLM(MixtralConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ref_shapes["model.layers.0.mlp.experts.gate_up_proj"] == (8, 2 * 1792, 512)
    assert sum(v.numel() for v in ref.state_dict().values()) == sum(s.numel for s in msc.tensor_specs(p))
    assert len(msc.plan_shards(msc.tensor_specs(p), 2, msc.MAX_SHARD_BYTES)) == 1  # 1.52 GB in bf16
    assert len(msc.plan_shards(msc.tensor_specs(p), 4, msc.MAX_SHARD_BYTES)) == 2  # 3.03 GB in fp32


def test_refuses_existing_out_and_cleans_up_on_failure(tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        msc.main([str(tmp_path / "taken"), "--preset", "tiny"])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(msc, "write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        msc.write_checkpoint(tmp_path / "new", "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # neither OUT nor a temp folder left
