"""tools/make_synthetic_store.py at tiny shapes: the same bytes as checkpoint -> quantize_experts, loads,
generates, verifies its checksums, resumes; and the fast rtn path matches its plain formula."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mixtral_lite.generation.decode import generate
from mixtral_lite.runtime import offloading
from mixtral_lite.runtime.load import load_model
from offload.quant import _PACK, QuantSpec, quantize_matrix
from offload.store import StoreError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28770]


sys.path.insert(0, str(ROOT / "tools"))  # tools/ is a folder of scripts: import them as make_synthetic_store does
mss, qe, msc = (importlib.import_module(n) for n in ("make_synthetic_store", "quantize_experts",
                                                      "make_synthetic_checkpoint"))
SPECS = {4: QuantSpec(4, 64), 2: QuantSpec(2, 32)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {b: mss.make_store(root / f"b{b}", "tiny", s, seed=5, progress=False) for b, s in SPECS.items()}


def _tensors(path: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out |= {k: h.get_tensor(k).view(-1).view(torch.uint8).numpy().tobytes() for k in h.keys()}
    return out


def test_same_bytes_as_quantizing_the_synthetic_checkpoint(stores, tmp_path):
    ckpt = msc.write_checkpoint(tmp_path / "ckpt", "tiny", seed=5)
    ref = qe.convert(ckpt, tmp_path / "ref", SPECS[4], mss.default_dense(), method="rtn", progress=False)
    assert _tensors(stores[4]) == _tensors(ref)
    ours, theirs = (json.loads((p / "manifest.json").read_text()) for p in (stores[4], ref))
    assert ours["experts"]["crc32"] == theirs["experts"]["crc32"]
    assert ours["dense"]["crc32"] == theirs["dense"]["crc32"]
    assert ours["source"]["synthetic"] == "tiny" and ours["source"]["seed"] == 5
    assert (stores[4] / "config.json").read_text() == (ckpt / "config.json").read_text()


@pytest.mark.parametrize("bits", [4, 2])
def test_loads_and_generates_resident_and_from_mmap(stores, bits):
    resident = generate(load_model(stores[bits]), [PROMPT], 5, window=64)
    mm = load_model(stores[bits], experts=offloading.make_factory(slots=2, store="mmap", prefetch=False))
    assert generate(mm, [PROMPT], 5, window=64) == resident
    assert mm.experts.stats()["expert_misses"] > 0  # the mmap path really read experts


def test_checksums_verify_and_catch_a_flipped_byte(stores, tmp_path):
    import shutil

    dst = tmp_path / "corrupt"
    shutil.copytree(stores[4], dst)
    shard = sorted(dst.glob("experts-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # inside the last expert of the first shard
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="crc32|checksum"):
        load_model(dst)


def test_killed_then_resumed_is_byte_identical(stores, tmp_path):
    dst = tmp_path / "resumed"
    with pytest.raises(qe.InjectedFailure):
        mss.make_store(dst, "tiny", SPECS[4], seed=5, progress=False, fail_after=3)
    mss.make_store(dst, "tiny", SPECS[4], seed=5, progress=False, resume=True)
    assert _tensors(dst) == _tensors(stores[4])
    with pytest.raises(qe.QuantizeError, match="source"):  # another seed is another source
        mss.make_store(dst, "tiny", SPECS[4], seed=6, progress=False, resume=True)


def test_full_size_preset_describes_mixtral_8x7b():
    src = mss.SyntheticSource("mixtral-8x7b")
    total = sum(torch.Size(src.shape(n)).numel() for n in src.names())
    assert src.config.num_layers == 32 and src.config.hidden_size == 4096 and src.config.intermediate_size == 14336
    assert abs(total - 46.70e9) < 0.01e9  # Mixtral-8x7B's published 46.7B parameters


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 32)])
def test_fast_rtn_matches_the_plain_formula(bits, group):
    """The in-place, one-pass rtn gives the codes round((W / scale) + zero) would (tolerance 0)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    spec = QuantSpec(bits, group)
    got = quantize_matrix(w, spec, "m", "cpu", "rtn")
    wg = w.reshape(-1, group)
    lo, hi = wg.amin(dim=1, keepdim=True), wg.amax(dim=1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    stored_scale, stored_zero = (((got[f"m.{p}.q"].float() - got[f"m.{p}.z"]) * got[f"m.{p}.s"]).reshape(-1, 1)
                                 for p in ("scale", "zero"))  # the 8-bit metadata as stored
    assert torch.allclose(stored_scale, scale, rtol=0.01, atol=scale.max().item() / 255)
    codes = torch.round(wg / stored_scale + stored_zero).clamp(0, 2**bits - 1)
    assert torch.equal(got["m.q"], _PACK[bits](codes))


def test_reuse_experts_writes_one_expert_everywhere_and_loads(tmp_path):
    dst = mss.make_store(tmp_path / "reuse", "tiny", SPECS[4], seed=5, progress=False, reuse=True)
    crcs = [c for layer in json.loads((dst / "manifest.json").read_text())["experts"]["crc32"] for c in layer]
    assert len(set(crcs)) == 1 and len(crcs) == 8
    mm = load_model(dst, experts=offloading.make_factory(slots=2, store="mmap", prefetch=False))
    assert len(generate(mm, [PROMPT], 3, window=64)[0]) == 3
