"""benchmarks/gguf_export.py: the GGUF file read back with the gguf package's reader (no llama.cpp needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from refs import save_reference

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from gguf_export import export, rope_permute  # noqa: E402

from mixtral_lite.model.checkpoint import Checkpoint, expert_name  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    _, path = save_reference(root / "tiny")
    return path, gguf.GGUFReader(export(path, root / "tiny.gguf"))


def _tensors(reader) -> dict[str, object]:
    return {t.name: t for t in reader.tensors}


def test_metadata_matches_the_config(exported):
    path, reader = exported
    cfg = Checkpoint(path).config
    want = {"general.architecture": "llama", "llama.block_count": cfg.num_layers,
            "llama.embedding_length": cfg.hidden_size, "llama.feed_forward_length": cfg.intermediate_size,
            "llama.attention.head_count": cfg.num_heads, "llama.attention.head_count_kv": cfg.num_kv_heads,
            "llama.rope.dimension_count": cfg.head_dim, "llama.rope.freq_base": cfg.rope_theta,
            "llama.context_length": cfg.max_position_embeddings, "llama.expert_count": cfg.num_experts,
            "llama.expert_used_count": cfg.experts_per_tok, "llama.vocab_size": cfg.vocab_size,
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    for key, value in want.items():
        assert reader.get_field(key).contents() == value, key
    eps = reader.get_field("llama.attention.layer_norm_rms_epsilon").contents()
    assert eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)


def test_every_tensor_is_the_checkpoints(exported):
    path, reader = exported
    ckpt, tensors = Checkpoint(path), _tensors(exported[1])
    cfg = ckpt.config

    def hf(name):
        return ckpt.get(name, torch.float32, "cpu").numpy()

    np.testing.assert_array_equal(tensors["token_embd.weight"].data, hf("model.embed_tokens.weight"))
    np.testing.assert_array_equal(tensors["output.weight"].data, hf("lm_head.weight"))
    for i in range(cfg.num_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q = rope_permute(torch.from_numpy(hf(p + "self_attn.q_proj.weight")), cfg.num_heads)
        k = rope_permute(torch.from_numpy(hf(p + "self_attn.k_proj.weight")), cfg.num_kv_heads)
        np.testing.assert_array_equal(tensors[b + "attn_q.weight"].data, q.numpy())
        np.testing.assert_array_equal(tensors[b + "attn_k.weight"].data, k.numpy())
        np.testing.assert_array_equal(tensors[b + "attn_v.weight"].data, hf(p + "self_attn.v_proj.weight"))
        np.testing.assert_array_equal(tensors[b + "ffn_gate_inp.weight"].data, hf(p + "block_sparse_moe.gate.weight"))
        for w, ours in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
            stacked = tensors[f"{b}{ours}.weight"].data
            assert stacked.shape[0] == cfg.num_experts
            for e in range(cfg.num_experts):
                np.testing.assert_array_equal(stacked[e], hf(expert_name(i, e, w)))
    np.testing.assert_array_equal(tensors["output_norm.weight"].data, hf("model.norm.weight"))
    assert len(tensors) == 3 + 10 * cfg.num_layers  # embed, norm, output; 4 attention, 2 norms, router, 3 experts


def _rope_half(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """HF's RoPE: dimension i pairs with i + d/2.  x [T, H, d]"""
    d = x.shape[-1]
    ang = pos[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)  # [T, d/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _rope_adjacent(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's RoPE for the llama architecture: dimensions 2i and 2i+1 form a pair.  x [T, H, d]"""
    d = x.shape[-1]
    ang = (pos[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d))[:, None]  # [T, 1, d/2]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1).flatten(-2)


def test_rope_permute_makes_adjacent_pair_rope_give_hf_attention_scores():
    torch.manual_seed(0)
    heads, kv_heads, d, D, T, theta = 4, 2, 16, 32, 7, 1e6
    wq, wk, x = torch.randn(heads * d, D), torch.randn(kv_heads * d, D), torch.randn(T, D)
    pos = torch.arange(T) + 3

    def scores(q_w, k_w, rope):
        q = rope((x @ q_w.T).view(T, heads, d), pos, theta)
        k = rope((x @ k_w.T).view(T, kv_heads, d), pos, theta).repeat_interleave(heads // kv_heads, 1)
        return torch.einsum("thd,shd->hts", q, k)

    want = scores(wq, wk, _rope_half)
    got = scores(rope_permute(wq, heads), rope_permute(wk, kv_heads), _rope_adjacent)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(scores(wq, wk, _rope_adjacent), want, atol=1e-2)  # the permute matters


def test_vocab_is_the_sentencepiece_model(exported):
    path, reader = exported
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    scores = reader.get_field("tokenizer.ggml.scores").contents()
    assert len(tokens) == sp.vocab_size() == 32000
    for i in (0, 1, 2, 3, 258, 259, 1000, 28705, 31999):
        assert tokens[i] == sp.id_to_piece(i)
        assert scores[i] == pytest.approx(sp.get_score(i))
    assert (types[0], types[1], types[2], types[3], types[1000]) == (2, 3, 3, 6, 1)  # unk, bos, eos, byte, normal


def test_f16_keeps_norms_and_routers_f32_and_tied_embeddings_have_no_output(tmp_path):
    _, path = save_reference(tmp_path / "tied", tie_word_embeddings=True)
    tensors = _tensors(gguf.GGUFReader(export(path, tmp_path / "t.gguf", dtype="f16")))
    assert "output.weight" not in tensors  # llama.cpp then reuses token_embd
    for name, t in tensors.items():
        f32 = name.endswith("norm.weight") or "ffn_gate_inp" in name
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if f32 else gguf.GGMLQuantizationType.F16), name
    w1 = Checkpoint(path).get(expert_name(1, 2, "w1"), torch.float32, "cpu").numpy()
    np.testing.assert_array_equal(tensors["blk.1.ffn_gate_exps.weight"].data[2], w1.astype(np.float16))


def test_missing_tokenizer_is_named_and_leaves_no_file(exported, tmp_path):
    path = tmp_path / "notok"
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        (path / name).symlink_to(exported[0] / name)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        export(path, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notok"]


def test_dense_mistral_has_plain_ffn_tensors_and_no_experts(tmp_path):
    _, path = save_reference(tmp_path / "mistral", arch="mistral", num_hidden_layers=1)
    reader = gguf.GGUFReader(export(path, tmp_path / "m.gguf"))
    tensors = _tensors(reader)
    assert reader.get_field("llama.expert_count") is None
    assert not any("exps" in n or "gate_inp" in n for n in tensors)
    up = Checkpoint(path).get("model.layers.0.mlp.up_proj.weight", torch.float32, "cpu").numpy()
    np.testing.assert_array_equal(tensors["blk.0.ffn_up.weight"].data, up)
    assert {"blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"} <= set(tensors)


def test_derived_artefacts_follow_a_rewritten_checkpoint(tmp_path):
    """bench_generate names a checkpoint's GGUF and quantized stores by source_stamp: a checkpoint
    rewritten in place (a later training snapshot) must get a new name, not its old weights' GGUF."""
    import os

    from generate_runners import source_stamp

    _, path = save_reference(tmp_path / "tiny")
    before = source_stamp(path)
    assert source_stamp(path) == before  # stable while nothing changes
    weights = next(path.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, rewritten later
    assert source_stamp(path) != before
