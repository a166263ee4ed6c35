"""-m FILE.gguf: logits against the dequantized weights run as a Hugging Face checkpoint, experts offloaded
exactly as resident ones, the converted-experts file read in place, GGUFs of every supported type."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from refs import save_reference
from safetensors.torch import save_file

from mixtral_lite.model.checkpoint import expected_shapes
from mixtral_lite.model.gguf import prepacked
from mixtral_lite.model.gguf.checkpoint import GGUFCheckpoint
from mixtral_lite.runtime.load import load_model
from mixtral_lite.runtime.offloading import make_factory
from offload.ggml import BY_NAME, requantize_int4
from offload.packing import views

pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from gguf_quantize import write  # noqa: E402

# widths every type takes: K-quant rows are 256 weights, the int4 kernel wants N % 16 and K % 32
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=3)
IDS = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28705, 13, 5183, 754, 302, 264, 1628, 2244]])
MIX = {"blk.1.ffn_down_exps.weight": "Q6_K", "blk.0.attn_k.weight": "Q8_0", "blk.2.attn_v.weight": "Q8_0",
       "output.weight": "Q6_K", "blk.2.ffn_up_exps.weight": "Q4_0"}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return save_reference(tmp_path_factory.mktemp("gguf_ref"), "mixtral", seed=4, **SHAPE)[1]


def dequantized(ckpt: GGUFCheckpoint, out: Path, requantized: bool = False) -> Path:
    """The GGUF's weights, dequantized, as a Hugging Face checkpoint (the reference). requantized: the expert
    matrices of types without an int4 form as the loader re-quantizes them (offload/ggml.py)."""
    cfg = ckpt.config
    tensors = {}
    for name in expected_shapes(cfg):
        w = ckpt.get(name, torch.float32, "cpu").contiguous()
        parts = name.split(".")
        if requantized and ".experts." in name and not ckpt.types[int(parts[2])][parts[6]].int4:
            codes, s, z = torch.empty(w.shape, dtype=torch.uint8), torch.empty(w.shape[0], w.shape[1] // 32), \
                torch.empty(w.shape[0], w.shape[1] // 32)
            requantize_int4(w, codes, s, z)
            w = (codes.float() - 8) * s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
        tensors[name] = w
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM" if cfg.is_moe else "MistralForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_tok, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "torch_dtype": "float32"}))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.inference_mode()
def logits(path, **kw) -> torch.Tensor:
    return load_model(path, **kw)(IDS)[0].float()


@pytest.mark.parametrize("qtype,overrides", [("Q4_0", {}), ("Q4_K", {}), ("Q4_1", {}), ("Q8_0", {}), ("Q6_K", {}),
                                             ("Q4_K", MIX)], ids=["Q4_0", "Q4_K", "Q4_1", "Q8_0", "Q6_K", "mix"])
def test_logits_match_the_dequantized_weights(ref, tmp_path, qtype, overrides):
    path = write(ref, tmp_path / "m.gguf", qtype, overrides)
    ckpt = GGUFCheckpoint(path)
    exact = logits(dequantized(ckpt, tmp_path / "ref", requantized=True))
    ours = logits(path)
    # The bound: our path rounds to bf16 where the int4 kernels take and give activations and where they
    # hold scale and zero (offload/ggml.py: relative 2^-9 each); everything else stays fp32. The same
    # weights run entirely in bf16 round at least as often, at every op, so their distance from the fp32
    # run bounds ours, up to the order of accumulation (factor 2).
    bf16 = logits(tmp_path / "ref", dtype=torch.bfloat16)
    bound = 2 * rel(bf16, exact)
    assert rel(ours, exact) < bound, (rel(ours, exact), bound)
    assert 1e-5 < bound < 0.05  # the bound is a bf16-sized one, not a blanket


def test_offloaded_experts_are_the_resident_ones(ref, tmp_path):
    path = write(ref, tmp_path / "mix.gguf", "Q4_K", MIX)
    want = logits(path)
    for store in ("ram", "mmap"):
        got = logits(path, experts=make_factory(slots=2, store=store, prefetch=True))
        assert torch.equal(got, want), store


def test_per_expert_tensors_read_as_stacked_ones(ref, tmp_path):
    stacked = write(ref, tmp_path / "stacked.gguf", "Q4_0")
    legacy = write(ref, tmp_path / "legacy.gguf", "Q4_0", legacy_experts=True)
    assert "blk.0.ffn_gate.3.weight" in GGUFCheckpoint(legacy).file.tensors
    assert torch.equal(logits(legacy), logits(stacked))


def test_dense_mistral(tmp_path):
    _, src = save_reference(tmp_path / "mistral", "mistral", seed=5, **SHAPE)
    path = write(src, tmp_path / "mistral.gguf", "Q4_K", {"blk.0.ffn_down.weight": "Q6_K"})
    ckpt = GGUFCheckpoint(path)
    assert not ckpt.config.is_moe and ckpt.quantized["model.layers.0.mlp.down_proj.weight"] == "Q6_K"
    exact = logits(dequantized(ckpt, tmp_path / "ref"))
    bf16 = logits(tmp_path / "ref", dtype=torch.bfloat16)
    assert rel(logits(path), exact) < 2 * rel(bf16, exact)


def test_converted_experts_file_is_read_in_place(ref, tmp_path):
    path = write(ref, tmp_path / "m.gguf", "Q4_0")
    converting = logits(path)
    assert "no m.gguf.int4-cpu" in GGUFCheckpoint(path).prepacked_note
    side = prepacked.write(GGUFCheckpoint(path), progress=False)
    ckpt = GGUFCheckpoint(path)
    assert ckpt.prepacked[0] == side and ckpt.codec("cpu", torch.float32).in_place
    model = load_model(path)
    assert "read in place" in model.kernel_notes["experts"]
    with torch.inference_mode():
        assert torch.equal(model(IDS)[0].float(), converting)
    assert torch.equal(logits(path, experts=make_factory(slots=2, store="mmap")), converting)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the GGUF changed: the file is stale
    ckpt = GGUFCheckpoint(path)
    assert ckpt.prepacked is None and "source_mtime_ns differ" in ckpt.prepacked_note
    assert torch.equal(logits(path), converting)


def test_truncated_converted_experts_file_is_named(ref, tmp_path):
    path = write(ref, tmp_path / "m.gguf", "Q4_0")
    side = prepacked.write(GGUFCheckpoint(path), progress=False)
    side.write_bytes(side.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=f"{side.name}.*truncated"):
        load_model(path)


def test_types_are_read_per_layer(ref, tmp_path):
    path = write(ref, tmp_path / "m.gguf", "Q4_K", MIX)
    ckpt = GGUFCheckpoint(path)
    assert [sorted({t.name for t in layer.values()}) for layer in ckpt.types] == [
        ["Q4_K"], ["Q4_K", "Q6_K"], ["Q4_0", "Q4_K"]]
    assert ckpt.ggml_codec("cpu").requantized == ["Q6_K"]
    w2 = next(e for e in ckpt.layout.entries if e.name == "w2")  # sized for the widest type of any layer
    assert w2.shape == (256, 512 // 256 * BY_NAME["Q6_K"].nbytes)


def test_table_engine_reads_a_gguf_layer_by_layer(ref, tmp_path):
    """The CUDA table engine (offload/table.py, its kernels emulated here) over a GGUF mixing types by layer:
    experts converted per layer into int4-rows, offloaded steps equal to resident ones."""
    from test_table_engine import EmulatedMoE, decode, routes

    from offload.table import TableEngine

    ckpt = GGUFCheckpoint(write(ref, tmp_path / "mix.gguf", "Q4_K", MIX))

    def engine(slots: int) -> TableEngine:
        codec = ckpt.rows_codec("cpu")
        moe = EmulatedMoE(codec)
        eng = TableEngine(ckpt.expert_store("ram"), codec, slots, "cpu", top_k=2, moe=moe)
        moe.register(*eng.cache.buffers())
        for layer in range(eng.layers):
            if eng.host is not None:
                moe.register(*eng.host[layer])
        return eng

    resident, offloaded = engine(4), engine(2)
    steps = routes(resident.layers, 4, 6)
    x = torch.randn(1, 256).to(torch.bfloat16)
    for a, b in zip(decode(resident, steps, x), decode(offloaded, steps, x), strict=True):
        assert torch.equal(a, b)
    rows = ckpt.rows_codec("cpu")
    for layer in (1, 2):  # Q6_K re-quantized in layer 1, Q4_0 in layer 2: each converted with its layer's types
        want = torch.empty(rows.slot_layout.nbytes, dtype=torch.uint8)
        rows.for_layer(layer).fill(ckpt.expert_store("mmap").pieces(layer, 3), views(want, rows.slot_layout))
        assert torch.equal(offloaded.host[layer][3], want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offloads_a_gguf_like_the_cpu(ref, tmp_path):
    """On a card: the blocks cross the bus and convert on the device (copy engine and table engine alike),
    offloaded equal to resident, and the logits within bf16 rounding of the CPU's."""
    path = write(ref, tmp_path / "mix.gguf", "Q4_K", MIX)
    ids = IDS.cuda()

    @torch.inference_mode()
    def run(**kw):
        return load_model(path, device="cuda", dtype=torch.bfloat16, **kw)(ids)[0].float().cpu()

    copy = {k: run(experts=make_factory(slots=k, store="ram", miss_policy="copy")) for k in (2, 4)}
    assert torch.equal(copy[2], copy[4])
    table = run(experts=make_factory(slots=2, store="ram"))  # the CUDA default: the table engine
    cpu = logits(path)
    for got in (copy[2], table):
        assert rel(got, cpu) < 0.02  # bf16 activations everywhere on the card, fp32 beside int4 on the CPU
