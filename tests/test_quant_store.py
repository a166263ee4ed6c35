"""tools/quantize_experts.py + mixtral_lite/model/qstore.py: quantize -> load -> generate, crash safety, checksums."""

from __future__ import annotations

import importlib.util
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_lite.cli.generate import main as generate_main
from mixtral_lite.generation.decode import generate
from mixtral_lite.model.checkpoint import Checkpoint, CheckpointError
from mixtral_lite.model.config import ModelConfig
from mixtral_lite.model.qstore import MANIFEST, DenseSettings, expert_matrices, is_quantized_store, open_store
from mixtral_lite.runtime import offloading
from mixtral_lite.runtime.load import load_model
from offload.kernels import QuantLinear
from offload.quant import QuantSpec, expert_layout
from offload.store import StoreError, read_header

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quantize_experts", ROOT / "tools" / "quantize_experts.py")
qe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qe)

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28770]
# Relative logit error ||logits_q - logits|| / ||logits|| on PROMPT, tiny random Mixtral (tests/refs.py),
# quantized experts only, measured (hqq 0.2.8, CPU, 8-bit metadata): 2b/g32 0.075, 3b/g64 0.036,
# 4b/g64 0.017, 8b/g128 0.0011. Bounds ~1.5x measured: a broken dequantization gives errors of order 1.
LOGIT_BOUND = {2: 0.11, 3: 0.055, 4: 0.026, 8: 0.0017}


def _spec(bits: int) -> QuantSpec:
    return QuantSpec(bits, qe.DEFAULT_GROUP[bits] if bits != 3 else 64)


@pytest.fixture(scope="module")
def stores(mixtral_q_ref, tmp_path_factory):
    _, src = mixtral_q_ref
    root = tmp_path_factory.mktemp("qstores")
    return src, {b: qe.convert(src, root / f"b{b}", _spec(b), progress=False) for b in (2, 3, 4, 8)}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([PROMPT]))[0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_load_generate(stores, bits):
    src, dsts = stores
    dst = dsts[bits]
    assert is_quantized_store(dst) and not is_quantized_store(src)
    ref = _logits(load_model(src))
    got = {}
    for store in ("ram", "mmap"):
        model = load_model(dst, experts=offloading.make_factory(slots=2, store=store, prefetch=False))
        got[store] = _logits(model)
        out = generate(model, [PROMPT], 6, window=64)
        assert len(out[0]) == 6
        s = model.experts.stats()
        nbytes = open_store(dst).expert_bytes
        # what crosses per miss is the packed expert: its tensor in the shard, every byte of it
        assert s["expert_bytes"] == nbytes == next(iter(read_header(open_store(dst).expert_files()[0]).values())).nbytes
        assert s["bytes_host_to_device"] == s["expert_misses"] * nbytes > 0
    assert torch.equal(got["ram"], got["mmap"])
    err = ((got["ram"] - ref).norm() / ref.norm()).item()
    assert err < LOGIT_BOUND[bits], f"{bits}-bit relative logit error {err:.4f}"


def test_default_factory_runs_quantized_store(stores):
    _, dsts = stores
    model = load_model(dsts[4])  # no factory: load_model routes the store through the offload engine
    assert model.experts.stats()["expert_bytes"] == open_store(dsts[4]).expert_bytes
    assert _logits(model).isfinite().all()


def test_dense_weights_quantized_into_fused_kernels(mixtral_q_ref, tmp_path):
    _, src = mixtral_q_ref
    dense = DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8)
    dst = qe.convert(src, tmp_path / "a4", _spec(4), dense, progress=False)
    st = open_store(dst)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert st.quantized[name] == "int4" and st.quantized["model.embed_tokens.weight"] == "int8"
    w = st.get(name, torch.float32, "cpu")  # dequantized: within quantization error of the source
    w_ref = Checkpoint(src).get(name, torch.float32, "cpu")
    assert tuple(w.shape) == (64, 64) and 0 < ((w - w_ref).norm() / w_ref.norm()).item() < 0.1
    model = load_model(dst)
    assert model.kernel_notes == {"int4": "fused int4 kernel", "int8": "fused int8 kernel",
                                  "experts": "fused int4 kernel on cpu"}
    assert isinstance(model.layers[1].attn.qkv_proj, QuantLinear) and isinstance(model.lm_head, QuantLinear)
    ref = load_model(dst, fused=False)  # the same weights, dequantized at load: the reference
    assert not any(isinstance(m, QuantLinear) for m in ref.modules())
    attn = ref.layers[1].attn  # q, k and v land in their rows of the fused projection
    for part, rows in attn.qkv_rows().items():
        want = st.get(f"model.layers.1.self_attn.{part}_proj.weight", torch.float32, "cpu")
        assert torch.equal(attn.qkv_proj.weight[rows], want), part
    got, want = _logits(model), _logits(ref)
    # bf16 activations in the fused kernels: ~2^-8 relative per product; a wrong layout gives O(1)
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert generate(model, [PROMPT], 8, window=64) == generate(ref, [PROMPT], 8, window=64)


def test_dense_checksum_names_the_tensor(mixtral_q_ref, tmp_path):
    _, src = mixtral_q_ref
    dst = qe.convert(src, tmp_path / "c", _spec(4), DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8),
                     progress=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    info = read_header(dst / "dense.safetensors")[name]
    data = bytearray((dst / "dense.safetensors").read_bytes())
    data[info.start + 7] ^= 0x10
    (dst / "dense.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"tensor {name!r} fails its checksum"):
        load_model(dst)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("kill_after", [3, 5])  # at a shard boundary; mid-shard with a torn write
def test_killed_then_resumed_is_byte_identical(mixtral_ref, tmp_path, kill_after):
    _, src = mixtral_ref
    spec = QuantSpec(3, 64)
    nbytes = expert_layout(expert_matrices(ModelConfig.from_dir(src)), spec).nbytes
    shard = 3 * nbytes  # 3 experts per shard, 4 shards
    full = qe.convert(src, tmp_path / "full", spec, shard_bytes=shard, progress=False)
    part = tmp_path / "part"
    with pytest.raises(qe.InjectedFailure):
        qe.convert(src, part, spec, shard_bytes=shard, fail_after=kill_after, progress=False)
    assert not is_quantized_store(part)  # no manifest: does not look complete
    done = sorted(p.name for p in part.glob("experts-*.safetensors"))
    assert len(done) == kill_after // 3  # only completed shards carry their final name
    for partial in part.glob("*.partial"):
        with open(partial, "ab") as f:
            f.write(b"half of an expert the kill interrupted")
    with open(part / qe.JOURNAL, "a") as f:
        f.write('{"expert": 5, "crc')  # and a journal line cut short
    with pytest.raises(qe.QuantizeError, match="not empty; pass --resume"):
        qe.convert(src, part, spec, shard_bytes=shard, progress=False)
    qe.convert(src, part, spec, shard_bytes=shard, resume=True, progress=False)
    assert _files(part) == _files(full)
    assert len(json.loads((full / MANIFEST).read_text())["experts"]["shards"]) == 4


def test_generate_cli_runs_store(stores, capsys):
    _, dsts = stores
    generate_main(["-m", str(dsts[3]), "-p", "It is a truth", "-n", "4", "--experts-per-layer", "2",
                   "--store", "mmap", "--ignore-eos"])
    err = capsys.readouterr().err
    assert "decode: 4 tokens" in err and "host->device" in err


def test_resume_with_other_settings_refused(mixtral_ref, tmp_path):
    _, src = mixtral_ref
    with pytest.raises(qe.InjectedFailure):
        qe.convert(src, tmp_path / "d", QuantSpec(4, 64), fail_after=1, progress=False)
    with pytest.raises(qe.QuantizeError, match="other settings or another source"):
        qe.convert(src, tmp_path / "d", QuantSpec(2, 32), resume=True, progress=False)


def test_resume_after_the_source_was_rewritten_refused(mixtral_ref, tmp_path):
    """Same shapes, same sizes, new weights (a later training snapshot written in place): the
    interrupted store must not be completed with experts from two different snapshots."""
    import os
    import shutil

    _, ref = mixtral_ref
    src = tmp_path / "src"
    shutil.copytree(ref, src)
    with pytest.raises(qe.InjectedFailure):
        qe.convert(src, tmp_path / "d", QuantSpec(4, 64), fail_after=1, progress=False)
    weights = next(src.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(qe.QuantizeError, match="other settings or another source"):
        qe.convert(src, tmp_path / "d", QuantSpec(4, 64), resume=True, progress=False)


def test_corrupt_expert_fails_checksum_naming_it(stores, tmp_path):
    _, dsts = stores
    dst = shutil.copytree(dsts[2], tmp_path / "corrupt")
    st = open_store(dst)
    file = st.expert_files()[0]
    info = read_header(file)["layers.1.experts.2"]
    data = bytearray(file.read_bytes())
    data[info.start + 100] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="layer 1 expert 2 fails its checksum"):
        load_model(dst, experts=offloading.make_factory(slots=2, store="ram"))
    with pytest.raises(StoreError, match="layer 1 expert 2 fails its checksum"):
        load_model(dst)  # every expert resident: converted, so verified, at load
    model = load_model(dst, experts=offloading.make_factory(slots=3, store="mmap", prefetch=False))
    with pytest.raises(StoreError, match="layer 1 expert 2 fails its checksum"):
        model(torch.arange(1, 200).view(1, -1))  # mmap verifies at first use; 199 tokens use every expert
    assert zlib.crc32(bytes(data[info.start : info.start + info.nbytes])) != \
        st.manifest["experts"]["crc32"][1][2]


@pytest.mark.parametrize("version, message", [
    (1, r"version 1, this mixtral-lite reads version 2 .*quantize_experts.py"),  # before the fused kernels
    (99, "store format version 99, this mixtral-lite reads version 2")])
def test_other_manifest_version_refused(stores, tmp_path, version, message):
    _, dsts = stores
    dst = shutil.copytree(dsts[8], tmp_path / "v")
    man = json.loads((dst / MANIFEST).read_text())
    man["version"] = version
    (dst / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=message):
        load_model(dst)


def test_missing_shard_named(stores, tmp_path):
    _, dsts = stores
    dst = shutil.copytree(dsts[8], tmp_path / "m")
    shard = open_store(dst).expert_files()[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: listed by manifest.json but missing"):
        load_model(dst)


def test_cli_bad_input(mixtral_ref, tmp_path, capsys):
    _, src = mixtral_ref
    assert qe.main([str(src), str(tmp_path / "x"), "--bits", "4", "--group-size", "12"]) == 2
    assert "unsupported group size 12" in capsys.readouterr().err
    assert qe.main([str(src), str(tmp_path / "x"), "--bits", "4", "--group-size", "4096"]) == 2
    assert "group size 4096 does not divide a 96x64 matrix" in capsys.readouterr().err
    assert qe.main([str(src), str(tmp_path / "x"), "--bits", "2", "--axis", "1", "--group-size", "1024"]) == 2
    assert "2-bit packing needs 4 | 6 rows" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert qe.main([str(src), str(tmp_path / "busy"), "--bits", "4"]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qe.main([str(src), str(tmp_path / "y"), "--bits", "5"])
    assert "invalid choice: 5" in capsys.readouterr().err


def test_missing_and_misshapen_source_tensors(mixtral_ref, tmp_path):
    _, src = mixtral_ref
    bad = shutil.copytree(src, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {name!r} is missing"):
        qe.convert(bad, tmp_path / "o1", QuantSpec(4, 64), progress=False)
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {name!r} has shape"):
        qe.convert(bad, tmp_path / "o2", QuantSpec(4, 64), progress=False)
