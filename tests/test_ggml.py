"""offload/ggml.py and offload/ggml_codec.py: GGML blocks read as gguf-py reads them, int4 forms exact,
re-quantization bounded, per-layer types converted into kernel slots."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offload.ggml import BY_NAME, GROUP, dequantize, int4_form, requantize_int4, row_bytes
from offload.ggml_codec import GGMLCodec, ggml_layout
from offload.kernels import ACT
from offload.packing import views
from offload.store import Piece

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from gguf_kquants import quantize as kquantize  # noqa: E402

U = 2.0**-8  # bf16's unit roundoff is 2^-8 relative (8 significant bits)
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes in `name`'s layout, with finite fp16 scales of either sign (every bit pattern of the
    codes and sub-scales is a valid block)."""
    t = BY_NAME[name]
    rng = np.random.default_rng(seed)
    raw = np.frombuffer(rng.bytes(rows * row_bytes(t, cols)), np.uint8).reshape(rows, -1).copy()
    blk = raw.reshape(rows, -1, t.nbytes)
    for at in FP16_FIELDS[name]:
        d = rng.normal(0, 0.01, blk.shape[:2]).astype(np.float16)
        blk[..., at : at + 2] = d.view(np.uint8).reshape(*blk.shape[:2], 2)
    return raw


@pytest.mark.parametrize("name", sorted(FP16_FIELDS))
def test_dequantize_is_gguf_py_bit_for_bit(name):
    raw = random_blocks(name, 6, 512)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    got = dequantize(BY_NAME[name], torch.from_numpy(raw), torch.empty(6, 512))
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_plain_types_are_their_values(name):
    x = torch.randn(4, 64)
    stored = x.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name])
    raw = stored.contiguous().view(torch.uint8).view(4, -1)
    assert torch.equal(dequantize(BY_NAME[name], raw, torch.empty(4, 64)), stored.float())


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_form_is_the_dequantized_matrix(name):
    raw = torch.from_numpy(random_blocks(name, 5, 512, seed=1))
    codes, scale, zero = torch.empty(5, 512, dtype=torch.uint8), torch.empty(5, 16), torch.empty(5, 16)
    int4_form(BY_NAME[name], raw, codes, scale, zero)
    assert int(codes.max()) < 16
    w = (codes.double() - 8) * scale.double().repeat_interleave(GROUP, 1) + zero.double().repeat_interleave(GROUP, 1)
    want = dequantize(BY_NAME[name], raw, torch.empty(5, 512)).double()
    # the same weights; fp32 evaluation order differs (q*s - m against (q-8)*s + (8s - m)): a few ulps
    assert ((w - want).abs() <= 4 * 2.0**-24 * (want.abs() + zero.double().abs().repeat_interleave(GROUP, 1))).all()


def test_q4_0_block_order_is_low_nibbles_then_high():
    block = np.zeros((1, 18), np.uint8)
    block[0, :2] = np.array([1.0], np.float16).view(np.uint8)
    block[0, 2:] = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
    codes, s, z = torch.empty(1, 32, dtype=torch.uint8), torch.empty(1, 1), torch.empty(1, 1)
    int4_form(BY_NAME["Q4_0"], torch.from_numpy(block), codes, s, z)
    assert codes[0].tolist() == list(range(16)) + list(range(15, -1, -1)) and s.item() == 1 and z.item() == 0


def test_requantize_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    codes, scale, zero = torch.empty(64, 256, dtype=torch.uint8), torch.empty(64, 8), torch.empty(64, 8)
    requantize_int4(w.clone(), codes, scale, zero)  # it overwrites its input
    back = (codes.float() - 8) * scale.repeat_interleave(GROUP, 1) + zero.repeat_interleave(GROUP, 1)
    step = scale.repeat_interleave(GROUP, 1)
    # round to nearest against the stored (bf16) scale and zero; the range's ends may sit one bf16
    # rounding of the scale times 15 steps beyond the codes' reach
    assert ((back - w).abs() <= step / 2 + 16 * U * step + 1e-9).all()


def test_requantize_keeps_a_constant_group():
    w = torch.full((1, 32), 0.5)  # max - min = 0: a zero scale would divide by zero
    codes, scale, zero = torch.empty(1, 32, dtype=torch.uint8), torch.empty(1, 1), torch.empty(1, 1)
    requantize_int4(w.clone(), codes, scale, zero)
    assert torch.equal((codes.float() - 8) * scale + zero, w)


@pytest.mark.parametrize("name,rel", [("Q4_K", 0.09), ("Q5_K", 0.045), ("Q6_K", 0.022)])
def test_k_quant_writers_round_trip_through_gguf_py(name, rel):
    x = np.random.default_rng(2).normal(0, 0.02, (16, 512)).astype(np.float32)
    back = gguf.quants.dequantize(kquantize(x, name), gguf.GGMLQuantizationType[name])
    # 4-, 5- and 6-bit codes: half a step of ~range/2^b per weight, ~0.29 step rms
    assert np.linalg.norm(back - x) / np.linalg.norm(x) < rel


def _expert(types_per_layer, d=256, i=512, seed=3):
    """One stored expert per layer (random blocks of each layer's types) and its codec."""
    shapes = {"w1": (i, d), "w2": (d, i), "w3": (i, d)}
    codec = GGMLCodec(shapes, types_per_layer, "cpu", stack={"w13": ("w1", "w3")}, order=("w1", "w3", "w2"))
    bufs, dense = [], []
    for layer, types in enumerate(types_per_layer):
        buf = torch.zeros(codec.layout.nbytes, dtype=torch.uint8)
        mats = {}
        for m, (n, k) in shapes.items():
            raw = torch.from_numpy(random_blocks(types[m].name, n, k, seed=seed + layer * 7 + len(m)))
            e = next(e for e in codec.layout.entries if e.name == m)
            buf[e.offset : e.offset + raw.numel()].copy_(raw.view(-1))
            mats[m] = dequantize(types[m], raw, torch.empty(n, k))
        bufs.append(buf)
        dense.append(mats)
    return codec, bufs, dense


def test_per_layer_types_convert_into_one_slot_layout():
    q4k, q6k, q40 = BY_NAME["Q4_K"], BY_NAME["Q6_K"], BY_NAME["Q4_0"]
    layers = [{"w1": q4k, "w2": q4k, "w3": q4k}, {"w1": q4k, "w2": q6k, "w3": q4k}, {"w1": q40, "w2": q40, "w3": q40}]
    codec, bufs, dense = _expert(layers)
    assert codec.layout == ggml_layout(codec.shapes, layers, ("w1", "w3", "w2"))
    assert next(e for e in codec.layout.entries if e.name == "w2").shape == (256, row_bytes(q6k, 512))  # widest
    assert codec.requantized == ["Q6_K"]
    x = torch.randn(3, 256).to(ACT)
    for layer, (buf, mats) in enumerate(zip(bufs, dense, strict=True)):
        slot = torch.empty(codec.slot_layout.nbytes, dtype=torch.uint8)
        codec.for_layer(layer).fill([Piece(buf, 0)], views(slot, codec.slot_layout))
        w13, w2 = codec.decode(views(slot, codec.slot_layout))
        want13 = x.double() @ torch.cat([mats["w1"], mats["w3"]]).double().t()
        assert (w13(x).double() - want13).norm() / want13.norm() < 4 * U  # bf16 x, scale, zero and result
        h = torch.randn(3, 512).to(ACT)
        want2 = h.double() @ mats["w2"].double().t()
        err2 = ((w2(h).double() - want2).norm() / want2.norm()).item()
        assert err2 < (0.12 if layers[layer]["w2"] is q6k else 4 * U)  # Q6_K re-quantized to 4 bits: lossy


def test_fill_from_pieces_equals_fill_from_one_buffer():
    """An expert handed over as the file's three regions (or split anywhere) converts as from one buffer."""
    q40 = BY_NAME["Q4_0"]
    codec, bufs, _ = _expert([{"w1": q40, "w2": q40, "w3": q40}])
    one, split = (torch.empty(codec.slot_layout.nbytes, dtype=torch.uint8) for _ in range(2))
    codec.for_layer(0).fill([Piece(bufs[0], 0)], views(one, codec.slot_layout))
    cut = codec.layout.entries[1].offset + 100  # inside w3: that matrix straddles two pieces
    pieces = [Piece(bufs[0][:cut], 0), Piece(bufs[0][cut:], cut)]
    codec.for_layer(0).fill(pieces, views(split, codec.slot_layout))
    assert torch.equal(one, split)


def test_convert_on_device_views_equals_fill():
    q4k = BY_NAME["Q4_K"]
    codec, bufs, _ = _expert([{"w1": q4k, "w2": q4k, "w3": q4k}])
    a, b = (torch.empty(codec.slot_layout.nbytes, dtype=torch.uint8) for _ in range(2))
    codec.for_layer(0).fill([Piece(bufs[0], 0)], views(a, codec.slot_layout))
    codec.for_layer(0).convert(views(bufs[0], codec.layout), views(b, codec.slot_layout))
    assert torch.equal(a, b)


def test_rows_form_holds_the_same_matrices():
    """rows=True (the CUDA table kernels' layout, offload/rows.py): the same weights as the torch layout."""
    q4k, q6k = BY_NAME["Q4_K"], BY_NAME["Q6_K"]
    layers = [{"w1": q4k, "w2": q6k, "w3": q4k}]
    codec, bufs, _ = _expert(layers)
    rows = GGMLCodec(codec.shapes, layers, "cpu", stack={"w13": ("w1", "w3")}, order=("w1", "w3", "w2"), rows=True)
    assert rows.layout == codec.layout and rows.slot_layout.form == "int4-rows"
    a, b = (torch.empty(c.slot_layout.nbytes, dtype=torch.uint8) for c in (codec, rows))
    codec.for_layer(0).fill([Piece(bufs[0], 0)], views(a, codec.slot_layout))
    rows.for_layer(0).fill([Piece(bufs[0], 0)], views(b, rows.slot_layout))
    x = torch.randn(2, 256).to(ACT)
    torch_w13, rows_w13 = codec.decode(views(a, codec.slot_layout))[0], rows.decode(views(b, rows.slot_layout))[0]
    assert (rows_w13(x).float() - torch_w13(x).float()).norm() / torch_w13(x).float().norm() < 4 * U
