"""benchmarks/gguf_synthetic.py: the Q4_0 GGUF read back with gguf's reader (llama.cpp only in the last test)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from gguf_export import plan  # noqa: E402
from gguf_synthetic import config, make_tensor, tensor_type, write  # noqa: E402

# hidden 256 so that `output` is Q6_K (llama.cpp falls back to Q8_0 when a row is not a multiple of 256)
SMALL = dict(vocab=32000, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, experts=4)
SEED = 3


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = write(tmp_path_factory.mktemp("gguf") / "small.gguf", SMALL, SEED)
    return path, gguf.GGUFReader(path)


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def test_metadata_is_an_8x7b_style_llama_moe(written):
    cfg, reader = config(SMALL), written[1]
    want = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 256,
            "llama.feed_forward_length": 512, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.expert_count": 4, "llama.expert_used_count": 2, "llama.vocab_size": 32000,
            "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0), "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    for key, value in want.items():
        assert reader.get_field(key).contents() == value, key
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == cfg.vocab_size


def test_names_shapes_and_types_are_llama_cpps_q4_0_mix(written):
    entries, tensors = plan(config(SMALL)), _tensors(written[1])
    assert list(tensors) == [e.name for e in entries]
    types = {}
    for e in entries:
        t = tensors[e.name]
        assert tuple(int(n) for n in reversed(t.shape)) == e.shape, e.name  # GGUF lists ne0 (the row) first
        types[e.name] = t.tensor_type.name
        assert types[e.name] == tensor_type(e.name, e.shape)
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_0"
    assert types["blk.1.ffn_down_exps.weight"] == "Q4_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.attn_k.weight"] == types["blk.0.attn_v.weight"] == "Q8_0"
    assert types["blk.0.ffn_gate_inp.weight"] == types["blk.0.attn_norm.weight"] == "F32"


def test_data_is_the_generators_and_dequantizes_to_std_0_02(written):
    entries, tensors = plan(config(SMALL)), _tensors(written[1])
    for i, e in enumerate(entries):
        data = np.asarray(tensors[e.name].data)
        assert np.array_equal(data.reshape(-1).view(np.uint8), make_tensor(e, i, SEED).reshape(-1).view(np.uint8))
        if tensor_type(e.name, e.shape) != "F32":
            w = gguf.quants.dequantize(data, tensors[e.name].tensor_type)
            assert w.shape == e.shape and abs(w.std() / 0.02 - 1) < 0.05, e.name
            # no shared bias (positive scales would give mean -0.5 d = -0.11 std): it makes greedy text repeat
            assert abs(w.mean()) < 0.03 * w.std(), e.name


def test_a_q4_0_block_is_q_minus_8_times_d(written):
    entries, tensors = plan(config(SMALL)), _tensors(written[1])
    i = next(k for k, e in enumerate(entries) if e.name == "blk.1.ffn_up_exps.weight")
    raw = make_tensor(entries[i], i, SEED).reshape(-1, 18)[5]  # the generator's sixth block
    d = float(raw[:2].view(np.float16)[0])
    q = np.concatenate([raw[2:] & 0x0F, raw[2:] >> 4]).astype(np.float32)  # weights 0-15 low, 16-31 high nibbles
    read = gguf.quants.dequantize(np.asarray(tensors[entries[i].name].data), gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(read.reshape(-1)[5 * 32:6 * 32], (q - 8) * np.float32(d))


def test_llama_cpp_loads_it_and_generates(written):
    pytest.importorskip("llama_cpp")
    from bench_fullsize_llamacpp import load

    # repacking off, as the benchmark runs: on a machine whose CPU reports AMX, a llama.cpp 0.3.36
    # built there died in its repacked path (SIGILL/SIGSEGV) on this file and on a mixtral-1/8 one
    llm = load({"gguf": str(written[0]), "repack": False, "threads": 1})
    out = llm.create_completion([1, 1000, 2000], max_tokens=4, temperature=0, top_k=1)
    assert out["usage"]["completion_tokens"] == 4
