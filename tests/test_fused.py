"""The fused int4/int8 kernels against the dequantize-then-multiply reference: per matrix, per expert,
offloaded against resident, and a dense Mistral store end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mixtral_lite.generation.decode import generate
from mixtral_lite.model.experts import FusedResidentExperts, swiglu_expert, swiglu_fused
from mixtral_lite.model.qstore import DenseSettings, open_store
from mixtral_lite.runtime import offloading
from mixtral_lite.runtime.load import load_model
from offload.fused import FusedCodec, fused_unsupported
from offload.kernels import ACT, QuantLinear, int4_specs, pack_int4_codes
from offload.packing import Layout, pack, views
from offload.quant import HQQCodec, QuantSpec, _grid, meta_values, quantize_expert, unpack_codes

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quantize_experts", ROOT / "tools" / "quantize_experts.py")
qe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qe)

PROMPTS = [[1, 415, 2936, 9060, 285, 1142, 28705, 28770], [1, 330, 1628, 754], [1, 28705, 13, 1014, 349, 264]]
U = 2.0**-8  # bf16's unit roundoff (8 bits of mantissa): the rounding every fused product carries


def _codes_scale_zero(parts: dict, shape: tuple[int, int], spec: QuantSpec):
    """q [N, K] and fp32 s, z [N, K/g] exactly as stored (hqq's unpacking and metadata arithmetic)."""
    n, k = shape
    rows, cols = _grid(shape, spec)
    q = torch.empty(rows, cols, dtype=torch.uint8)
    unpack_codes(parts["w.q"], spec.bits, q, torch.empty(parts["w.q"].numel(), dtype=parts["w.q"].dtype))
    m = n * k // spec.group_size
    s, z = (meta_values(parts, f"w.{p}", spec, torch.empty(m, 1), torch.empty(m)) for p in ("scale", "zero"))
    return q.view(n, k).float(), s.view(n, -1), z.view(n, -1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("n", [128, 48])  # 128: our fast packing (N % 64 == 0); 48: torch's converter
def test_fused_matrix_equals_dequantized_within_bf16_rounding(bits, group, n):
    torch.manual_seed(bits * 1000 + group + n)
    k = 512
    spec = QuantSpec(bits, group, 1, 8)
    w = torch.randn(n, k) * 0.02
    parts = quantize_expert({"w": w}, spec, "cpu")
    buf, layout = pack(parts)
    codec = FusedCodec({"w": (n, k)}, spec, "cpu")
    slot = torch.empty(codec.slot_layout.nbytes, dtype=torch.uint8)
    codec.convert(views(buf, layout), views(slot, codec.slot_layout))
    (mat,) = codec.decode(views(slot, codec.slot_layout))
    x = torch.randn(3, k).to(ACT)
    got = mat(x).double()

    q, s, z = _codes_scale_zero(views(buf, layout), (n, k), spec)
    rep = lambda t: t.repeat_interleave(group, dim=1).double()  # noqa: E731
    hqq_w = HQQCodec({"w": (n, k)}, spec, "cpu", torch.float32).decode(views(buf, layout))[0].double()
    # 1. the kernel's weights: (q - 8) * s + (8 - z) * s with s and (8 - z) * s rounded to bf16, so each
    # weight is within U * (|q - 8| + |8 - z|) * s of hqq's own dequantization
    s16, z16 = s.to(ACT).double(), ((8 - z) * s).to(ACT).double()
    kern_w = (q.double() - 8) * rep(s16) + rep(z16)
    assert ((kern_w - hqq_w).abs() <= U * ((q.double() - 8).abs() + rep(8 - z).abs()) * rep(s) + 1e-9).all()
    # 2. the product: exact weights times bf16 x, accumulated in fp32, one bf16 rounding of the result
    want = x.double() @ kern_w.t()
    tol = U * want.abs() + 1e-5 * (x.double().abs() @ kern_w.abs().t())
    assert ((got - want).abs() <= tol).all(), ((got - want).abs() - tol).max()


def test_fast_packing_is_torchs_layout():
    for n, k in [(64, 32), (128, 256), (1792, 512)]:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        out = torch.empty(n, k // 2, dtype=torch.uint8)
        pack_int4_codes(codes, out)
        assert torch.equal(out, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 2))


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 64), (4, 128)])
def test_fused_expert_equals_dequantized_expert(bits, group):
    torch.manual_seed(bits)
    d, i = 256, 384
    spec = QuantSpec(bits, group, 1, 8)
    shapes = {"w1": (i, d), "w2": (d, i), "w3": (i, d)}
    mats = {n: torch.randn(s) * 0.05 for n, s in shapes.items()}
    buf, layout = pack(quantize_expert(mats, spec, "cpu"))
    codec = FusedCodec(shapes, spec, "cpu", stack={"w13": ("w1", "w3")})
    assert codec.names == ("w13", "w2") and codec.layout == layout
    slot = torch.empty(codec.slot_layout.nbytes, dtype=torch.uint8)
    codec.fill([offloading_piece(buf)], views(slot, codec.slot_layout))
    x = torch.randn(5, d)
    got = swiglu_fused(x, *codec.decode(views(slot, codec.slot_layout)))
    ref = swiglu_expert(x.to(ACT).float(), *HQQCodec(shapes, spec, "cpu", torch.float32).decode(views(buf, layout)))
    # bf16 roundings of x, the hidden activations and the output, ~U each, and of scale and (8 - z) * s: the
    # kernel's (q - 8) offset puts low-bit codes ~(8 - 2^(b-1)) steps from 8, so that rounding is amplified
    # by ~16 / 2^b relative to the weight (2-bit codes: ~6x what 4-bit ones see)
    err = ((got - ref).norm() / ref.norm()).item()
    assert got.dtype == x.dtype and err < U * (4 + 48 / 2**bits)


def offloading_piece(buf):
    from offload.store import Piece

    return Piece(buf, 0)


def test_unsupported_settings_say_why():
    assert "axis 0" in fused_unsupported({"w": (64, 64)}, QuantSpec(4, 64, 0), "cpu")
    assert "8-bit" in fused_unsupported({"w": (64, 64)}, QuantSpec(8, 64, 1), "cpu")
    assert "group size 16" in fused_unsupported({"w": (64, 64)}, QuantSpec(2, 16, 1), "cpu")
    assert "input width 96" in fused_unsupported({"w": (64, 96)}, QuantSpec(4, 64, 1), "cpu")
    assert fused_unsupported({"w": (64, 128)}, QuantSpec(4, 64, 1), "cpu") is None
    assert int4_specs("w", 64, 128, 64, "cpu") == [("w.w", torch.uint8, (64, 64)), ("w.sz", ACT, (2, 64, 2))]


@pytest.fixture(scope="module")
def fused_store(mixtral_q_ref, tmp_path_factory):
    _, src = mixtral_q_ref
    dense = DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8)
    return qe.convert(src, tmp_path_factory.mktemp("fused") / "q4", QuantSpec(4, 64, 1, 8), dense, progress=False)


def _logits(model, ids):
    with torch.no_grad():  # ids built where the model lives (the model would move host ids itself)
        return model(torch.tensor([ids], device=model.embed.weight.device))[0]


@pytest.mark.parametrize("store", ["ram", "mmap"])
def test_offloaded_fused_equals_resident_fused_for_every_k(fused_store, store):
    resident = load_model(fused_store)  # every expert cached
    want = [_logits(resident, p) for p in PROMPTS]
    want_tokens = generate(resident, PROMPTS, 10, window=64)
    nbytes = open_store(fused_store).expert_bytes
    assert isinstance(resident.experts, FusedResidentExperts)  # converted once at load, no cache bookkeeping
    for k in (2, 3):  # of 4 experts per layer
        for prefetch in (False, True):
            model = load_model(fused_store, experts=offloading.make_factory(slots=k, store=store, prefetch=prefetch))
            for p, w in zip(PROMPTS, want, strict=True):
                assert torch.equal(_logits(model, p), w), (k, store, prefetch)
            assert generate(model, PROMPTS, 10, window=64) == want_tokens
        s = model.experts.stats()
        loads = s["expert_misses"] + s.get("prefetch_issued", 0)  # what crosses per load: the packed bytes
        assert s["expert_bytes"] == nbytes and s["bytes_host_to_device"] == loads * nbytes > 0


def test_fused_greedy_tokens_match_dequantized_path(fused_store):
    fused, ref = load_model(fused_store), load_model(fused_store, fused=False)
    got, want = generate(fused, PROMPTS, 12, window=64), generate(ref, PROMPTS, 12, window=64)
    agree = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    # a random tiny model's logits are nearly flat, so bf16 rounding can flip a near-tie (35 of 36 agree
    # here); a wrong kernel layout agrees on almost none. The shipped model's share is in quant_quality.
    assert agree >= 32, (got, want)
    assert [g[0] for g in got] == [w[0] for w in want]


def test_rtn_store_same_format_close_to_hqq(mixtral_q_ref, tmp_path):
    _, src = mixtral_q_ref
    spec = QuantSpec(4, 64, 1, 8)
    hqq = qe.convert(src, tmp_path / "hqq", spec, progress=False)
    rtn = qe.convert(src, tmp_path / "rtn", spec, progress=False, method="rtn")
    a, b = open_store(hqq), open_store(rtn)
    assert a.layout == b.layout and a.manifest["quantizer"]["method"] == "hqq" != b.manifest["quantizer"]["method"]
    ref = load_model(src)
    err = {}
    for name, d in (("hqq", hqq), ("rtn", rtn)):
        got, want = _logits(load_model(d), PROMPTS[0]), _logits(ref, PROMPTS[0])
        err[name] = ((got - want).norm() / want.norm()).item()
    assert err["rtn"] < 0.05 and err["hqq"] < 0.05, err  # 4-bit: a few percent; a broken format gives O(1)


def test_dense_mistral_quantized_end_to_end(mistral_ref, tmp_path):
    _, src = mistral_ref  # hidden 64, intermediate 96: group 32 divides every input width
    dense = DenseSettings(QuantSpec(4, 32, 1, 16), False, 8, 8)
    dst = qe.convert(src, tmp_path / "m4", QuantSpec(4, 32, 1, 8), dense, progress=False)
    st = open_store(dst)
    assert st.expert_files() == [] and st.quantized["model.layers.0.mlp.down_proj.weight"] == "int4"
    model = load_model(dst)
    assert model.kernel_notes == {"int4": "fused int4 kernel", "int8": "fused int8 kernel"}
    assert isinstance(model.layers[0].mlp.down_proj, QuantLinear)
    ref = load_model(dst, fused=False)
    got, want = _logits(model, PROMPTS[0]), _logits(ref, PROMPTS[0])
    assert ((got - want).norm() / want.norm()).item() < 0.02
    src_logits = _logits(load_model(src), PROMPTS[0])
    assert ((got - src_logits).norm() / src_logits.norm()).item() < 0.5  # random tiny model, 4/8-bit everything
    assert len(generate(model, PROMPTS, 5, window=64)[0]) == 5


def test_slot_layout_is_kernel_layout(fused_store):
    codec = open_store(fused_store).codec("cpu", torch.float32)
    assert isinstance(codec, FusedCodec)
    names = [e.name for e in codec.slot_layout.entries]
    assert names == ["w13.w", "w13.sz", "w2.w", "w2.sz"]
    assert isinstance(codec.slot_layout, Layout) and codec.slot_layout.nbytes > codec.layout.nbytes // 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_store_matches_cpu(fused_store):
    cpu = _logits(load_model(fused_store, dtype=torch.bfloat16), PROMPTS[0]).float()
    gpu_model = load_model(fused_store, device="cuda", dtype=torch.bfloat16)
    assert gpu_model.kernel_notes["experts"].startswith(("int4-rows table kernels on cuda", "dequantize"))
    gpu = _logits(gpu_model, PROMPTS[0]).float().cpu()
    assert ((gpu - cpu).norm() / cpu.norm()).item() < 0.03
    # 2 of 4 experts in slots, the others read in place from pinned RAM: the same kernels, the same bytes
    off = load_model(fused_store, device="cuda", dtype=torch.bfloat16,
                     experts=offloading.make_factory(slots=2, store="ram"))
    assert off.experts.stats()["device_expert_bytes"] < gpu_model.experts.stats()["device_expert_bytes"]
    assert torch.equal(_logits(off, PROMPTS[0]).float().cpu(), gpu)
    # the copying engine on torch's int4 kernel: the same model within bf16 rounding
    copy = load_model(fused_store, device="cuda", dtype=torch.bfloat16,
                      experts=offloading.make_factory(slots=2, store="mmap", miss_policy="copy"))
    got = _logits(copy, PROMPTS[0]).float().cpu()
    assert ((got - gpu).norm() / gpu.norm()).item() < 0.03
