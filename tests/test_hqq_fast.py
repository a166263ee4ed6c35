"""offload/hqq_fast.py: hqq's optimiser in cache-sized chunks gives hqq's result (one chunk: bit for bit;
chunked: the same weight error within 1%), and quantize_experts --method hqq-fast stores match hqq's."""

from __future__ import annotations

import pytest
import torch
from hqq.core.quantize import Quantizer

from offload.hqq_fast import hqq_axis1

CASES = [(4, 64), (3, 64), (2, 32)]


def _weights() -> torch.Tensor:
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02


def _err(w, scale, zero, bits, g) -> float:
    wg = w.reshape(-1, g)
    q = (wg / scale + zero).round().clamp(0, 2**bits - 1)
    return float(((q - zero) * scale - wg).abs().mean())


@pytest.mark.parametrize("bits,g", CASES)
def test_one_chunk_is_hqq_bit_for_bit(bits, g):
    w = _weights()
    _, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=g, optimize=True, round_zero=bits == 4,
                                 axis=1, bitpack=False, device="cpu")
    scale, zero = hqq_axis1(w, bits, g, bits == 4, chunk=10**9)
    assert torch.equal(scale, meta["scale"]) and torch.equal(zero, meta["zero"])


@pytest.mark.parametrize("bits,g", CASES)
def test_chunks_keep_hqqs_weight_error(bits, g):
    w = _weights()
    _, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=g, optimize=True, round_zero=bits == 4,
                                 axis=1, bitpack=False, device="cpu")
    ref = _err(w, meta["scale"], meta["zero"], bits, g)
    got = _err(w, *hqq_axis1(w, bits, g, bits == 4, chunk=64), bits, g)  # 64 groups a chunk: many chunks
    assert got <= ref * 1.01


def _dequantized(store, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
    from offload.packing import views
    from offload.quant import HQQCodec, QuantSpec, layout_from_dict

    ex = store.manifest["experts"]
    spec, layout = QuantSpec.from_dict(ex["spec"]), layout_from_dict(ex["layout"])
    piece = store.expert_store("ram").pieces(layer, expert)[0]
    codec = HQQCodec({k: tuple(v) for k, v in ex["matrices"].items()}, spec, "cpu", torch.float32)
    return tuple(t.clone() for t in codec.decode(views(piece.src[: layout.nbytes], layout)))


def test_store_dequantizes_like_the_hqq_store(mixtral_q_ref, tmp_path):
    """Same checkpoint through --method hqq and hqq-fast: each expert's dequantized weights are as close to
    the source as hqq's (relative error within 1%)."""
    import importlib.util
    from pathlib import Path

    from mixtral_lite.model.checkpoint import Checkpoint, expert_name
    from mixtral_lite.model.qstore import open_store
    from offload.quant import QuantSpec

    root = Path(__file__).resolve().parents[1]
    spec_ = importlib.util.spec_from_file_location("qe_fast", root / "tools" / "quantize_experts.py")
    qe = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(qe)
    _, src = mixtral_q_ref
    ckpt = Checkpoint(src)
    a, b = (open_store(qe.convert(src, tmp_path / m, QuantSpec(4, 64), progress=False, method=m))
            for m in ("hqq", "hqq-fast"))
    for layer, e in ((0, 0), (1, 3)):
        ref = [ckpt.get(expert_name(layer, e, w), torch.float32, "cpu") for w in ("w1", "w2", "w3")]
        for wa, wb, w in zip(_dequantized(a, layer, e), _dequantized(b, layer, e), ref, strict=True):
            ea, eb = float((wa - w).norm() / w.norm()), float((wb - w).norm() / w.norm())
            assert eb <= ea * 1.01
