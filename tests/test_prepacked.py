"""Experts stored in the CPU int4 kernel's layout (--prepack): the hqq store's outputs, bitwise, with
nothing converted; the layout's own unpacking; and the errors that name the flag."""

from __future__ import annotations

import json

import pytest
import torch
from test_fused import PROMPTS, _logits, qe

from mixtral_lite.generation.decode import generate
from mixtral_lite.model.checkpoint import CheckpointError
from mixtral_lite.model.experts import FusedResidentExperts
from mixtral_lite.model.qstore import DenseSettings, QStore, open_store
from mixtral_lite.runtime import offloading
from mixtral_lite.runtime.load import load_model
from offload.kernels import CPU_LAYOUTS, native_cpu_layout
from offload.prepacked import PrepackedCodec, packing_name
from offload.quant import QuantSpec

DENSE = DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8)


@pytest.fixture(scope="module")
def stores(mixtral_q_ref, tmp_path_factory):
    _, src = mixtral_q_ref
    root = tmp_path_factory.mktemp("prepacked")
    spec = QuantSpec(4, 64, 1, 8)
    hqq = qe.convert(src, root / "hqq", spec, DENSE, progress=False)
    return hqq, qe.convert(src, root / "pre", spec, DENSE, progress=False, prepack=True)


@pytest.mark.parametrize("layout", list(CPU_LAYOUTS.values()), ids=list(CPU_LAYOUTS))
@pytest.mark.parametrize("n,k", [(64, 32), (128, 256), (256, 64)])
def test_unpacking_inverts_packing(layout, n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = torch.empty(n * k // 2, dtype=torch.uint8)
    layout.pack(codes, packed)
    back = torch.empty_like(codes)
    layout.unpack(packed, back)
    assert torch.equal(back, codes)
    with pytest.raises(ValueError, match=f"multiples of {layout.block}"):
        layout.unpack(packed[: 16 * k // 2], torch.empty(16, k, dtype=torch.uint8))


def test_the_store_holds_the_kernel_layout(stores):
    hqq, pre = stores
    a, b = open_store(hqq), open_store(pre)
    assert b.packing == packing_name(native_cpu_layout()) and a.packing == "hqq"
    codec = b.codec("cpu", torch.float32)
    assert isinstance(codec, PrepackedCodec) and codec.slot_layout == codec.layout == b.layout
    assert f"stored in the {native_cpu_layout().name} CPU layout (read in place)" in b.codec_note
    # the same bytes a fused slot of the hqq store holds after its conversion at load
    assert b.expert_bytes == a.codec("cpu", torch.float32).slot_layout.nbytes
    man = json.loads((pre / "manifest.json").read_text())
    assert man["quantization"]["experts"]["bits_per_weight"] == pytest.approx(4.5)


def test_prepacked_equals_hqq_resident_offloaded_and_on_the_host(stores):
    hqq, pre = stores
    want = [_logits(load_model(hqq), p) for p in PROMPTS]
    want_tokens = generate(load_model(hqq), PROMPTS, 8, window=64)
    resident = load_model(pre)
    assert isinstance(resident.experts, FusedResidentExperts)
    for p, w in zip(PROMPTS, want, strict=True):
        assert torch.equal(_logits(resident, p), w)
    for store in ("ram", "mmap"):
        for miss in ("copy", "cpu"):
            model = load_model(pre, experts=offloading.make_factory(slots=2, store=store, miss_policy=miss))
            for p, w in zip(PROMPTS, want, strict=True):
                assert torch.equal(_logits(model, p), w), (store, miss)
            assert generate(model, PROMPTS, 8, window=64) == want_tokens
            assert miss == "copy" or model.experts.engine.host.in_place  # host runs read the store in place
            s = model.experts.stats()
            loads = s["expert_copies"] + s["prefetch_issued"]
            assert s["bytes_host_to_device"] == loads * open_store(pre).expert_bytes


def test_resident_experts_read_the_mapped_file_in_place(stores):
    _, pre = stores
    model = load_model(pre)
    files = [open(f, "rb").read() for f in open_store(pre).expert_files()]
    buf = model.experts.buffers[0]
    assert bytes(buf.numpy()) in files[0]  # the first expert's stored bytes, unconverted
    assert buf.untyped_storage().nbytes() >= len(files[0]) > buf.numel()  # a view of the mapped shard, not a copy


def test_flags_and_manifest_errors_name_the_setting(stores, mixtral_q_ref, tmp_path, capsys):
    hqq, pre = stores
    _, src = mixtral_q_ref
    assert qe.main([str(src), str(tmp_path / "q8"), "--bits", "8", "--prepack", "--attn-bits", "16"]) == 2
    assert "--prepack: 8-bit codes" in capsys.readouterr().err
    assert qe.main([str(src), str(pre), "--resume", "--meta-bits", "8", "--head-bits", "8", "--embed-bits", "8",
                    "--attn-bits", "4"]) == 2
    assert f"expert layout (--prepack): store {packing_name(native_cpu_layout())}, now hqq" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=r"--prepack.*dequantize-then-multiply path reads hqq's layout only"):
        QStore(pre, fused=False).codec("cpu", torch.float32)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pre.iterdir():
        (broken / f.name).symlink_to(f)
    man = json.loads((pre / "manifest.json").read_text())
    man["experts"]["packing"] = "int4-gpu"
    (broken / "manifest.json").unlink()
    (broken / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="expert packing 'int4-gpu' is not one this mixtral-lite reads"):
        open_store(broken)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_converts_the_stored_layout_to_the_same_products(stores):
    hqq, pre = stores

    def run(path, k):
        model = load_model(path, device="cuda", dtype=torch.bfloat16,
                           experts=offloading.make_factory(slots=k, store="ram"))
        return model(torch.tensor([PROMPTS[0]], device="cuda"))[0].float().cpu()
    for k in (2, 4):
        assert torch.equal(run(pre, k), run(hqq, k)), k


def test_host_misses_from_an_hqq_store_say_they_convert(stores, capsys):
    hqq, pre = stores
    for path, converts in ((hqq, True), (pre, False)):
        load_model(path, experts=offloading.make_factory(slots=2, store="mmap", miss_policy="cpu"))
        assert ("quantize_experts.py --prepack" in capsys.readouterr().err) == converts, path
