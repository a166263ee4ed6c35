"""torch's CPU int4 layout depends on the CPU capability (AVX-512, AVX2, default): our packing must write
the one the running kernel reads, a self-check must refuse a kernel that computes something else, and a
--prepack store must give the same products on a CPU of another capability.

The cross-capability tests run pytest in subprocesses with ATEN_CPU_CAPABILITY set (torch then dispatches
to that capability's kernels on any x86 machine), so every machine, CI's included, tests every layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_lite.model.qstore import open_store
from offload import kernels
from offload.kernels import CPU_LAYOUTS, Int4Mat, int4_self_check, native_cpu_layout, pack_int4_codes
from offload.packing import views

ROOT = Path(__file__).resolve().parents[1]


def _capabilities() -> list[str]:
    """The ATEN_CPU_CAPABILITY values this machine can select: the native one and every lower one."""
    order = ["default", "avx2", "avx512"]
    native = torch.backends.cpu.get_cpu_capability().lower()
    return order[: order.index(native) + 1] if native in order else ["default"]


CAPS = _capabilities()


@pytest.mark.parametrize("n,k", [(64, 64), (128, 256), (48, 128), (96, 64), (32, 32)])
def test_packing_is_what_torchs_converter_writes_here(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    ours = torch.empty(n, k // 2, dtype=torch.uint8)
    pack_int4_codes(codes, ours)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    assert torch.equal(ours.view(-1), theirs.reshape(-1).view(torch.uint8))


def test_the_native_layout_is_found_and_the_self_check_passes():
    cap = torch.backends.cpu.get_cpu_capability().lower()
    lay = native_cpu_layout()
    assert lay is not None and (cap not in CPU_LAYOUTS or lay.name == cap)
    assert int4_self_check("cpu") is None


def test_a_wrong_layout_is_refused_by_the_self_check(monkeypatch):
    wrong = next(lay for lay in CPU_LAYOUTS.values() if lay != native_cpu_layout())
    monkeypatch.setattr(kernels, "native_cpu_layout", lambda: wrong)
    kernels._int4_check.cache_clear()
    try:
        why = int4_self_check("cpu")
        assert why is not None and "capability" in why and f"the {wrong.name} layout" in why, why
        assert kernels.int4_unsupported(128, 128, 32, "cpu") == why  # so the fused path is not taken
    finally:
        kernels._int4_check.cache_clear()


def test_a_kernel_product_in_each_layout_equals_the_dequantized_matrix_only_in_the_native_one():
    # the failure the self-check exists for: codes in another capability's layout compute garbage
    n, k, g = 128, 256, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale, zero = torch.rand(n, k // g) * 0.02 + 0.01, torch.rand(n, k // g) * 16
    sz = torch.empty(k // g, n, 2, dtype=torch.bfloat16)
    kernels.pack_int4_meta(scale, zero, sz)
    dense = (codes.float() - 8) * sz[..., 0].float().t().repeat_interleave(g, 1) + \
        sz[..., 1].float().t().repeat_interleave(g, 1)
    x = torch.randn(2, k).bfloat16()
    want = x.float() @ dense.t()
    for lay in CPU_LAYOUTS.values():
        w = torch.empty(n, k // 2, dtype=torch.uint8)
        lay.pack(codes, w.view(-1))
        err = kernels.relative_error(Int4Mat(w, sz, g, n)(x), want)
        assert (err < kernels.CHECK_TOLERANCE) == (lay == native_cpu_layout()), (lay.name, err)


def _pytest(cap: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("cap", [c for c in CAPS if c != CAPS[-1]])
def test_fused_and_prepacked_suites_pass_under_a_lower_capability(cap):
    """The suites that feed torch's CPU int4 kernel, run again as an AVX2 or default-only CPU runs them."""
    files = ["tests/test_cpu_layouts.py", "tests/test_fused.py", "tests/test_prepacked.py",
             "tests/test_quant_store.py"]
    r = _pytest(cap, "-k", "not lower_capability and not another_capability", *files)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


_WRITE = """
import sys, torch
sys.path.insert(0, "tools")
import quantize_experts as qe
from mixtral_lite.model.qstore import DenseSettings
from offload.quant import QuantSpec
spec = QuantSpec(4, 64, 1, 8)
qe.convert(sys.argv[1], sys.argv[2], spec, DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8), progress=False,
           prepack=True)
"""

_READ = """
import json, sys, torch
from mixtral_lite.runtime.load import load_model
from mixtral_lite.runtime import offloading
ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
out = {}
for name, experts in (("resident", None), ("copy", offloading.make_factory(slots=2, store="mmap")),
                      ("host", offloading.make_factory(slots=2, store="ram", miss_policy="cpu"))):
    model = load_model(sys.argv[1], **({} if experts is None else {"experts": experts}))
    with torch.no_grad():
        out[name] = model(ids)[0].float().tolist()
print(json.dumps({"cap": torch.backends.cpu.get_cpu_capability(), "logits": out}))
"""


def _python(cap: str, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(len(CAPS) < 2, reason="this machine selects one CPU capability only")
def test_a_prepacked_store_written_under_one_capability_reads_the_same_under_another(mixtral_q_ref, tmp_path):
    _, src = mixtral_q_ref
    stores, logits = {}, {}
    for cap in (CAPS[0], CAPS[-1]):
        stores[cap] = tmp_path / cap
        r = _python(cap, _WRITE, str(src), str(stores[cap]))
        assert r.returncode == 0, r.stderr[-2000:]
        packing = json.loads((stores[cap] / "manifest.json").read_text())["experts"]["packing"]
        assert packing == f"int4-cpu-{cap}"
    for written in stores:
        for cap in CAPS:
            r = _python(cap, _READ, str(stores[written]))
            assert r.returncode == 0, r.stderr[-2000:]
            logits[written, cap] = json.loads(r.stdout.splitlines()[-1])["logits"]
    ref = torch.tensor(logits[CAPS[-1], CAPS[-1]]["resident"])
    for (written, cap), runs in logits.items():
        for name, got in runs.items():
            # another capability's kernel sums in another order: equal within bf16 rounding, not bitwise
            err = kernels.relative_error(torch.tensor(got), ref)
            assert err < 0.02, (written, cap, name, err)
    # the two stores hold the same codes in two nibble orders
    a, b = (open_store(stores[c]) for c in (CAPS[0], CAPS[-1]))
    va, vb = (views(s.expert_store("ram").pieces(0, 1)[0].src, s.layout)["w13.w"] for s in (a, b))
    assert not torch.equal(va, vb)
    ca, cb = torch.empty(256, 64, dtype=torch.uint8), torch.empty(256, 64, dtype=torch.uint8)
    a.cpu_layout.unpack(va.reshape(-1), ca)
    b.cpu_layout.unpack(vb.reshape(-1), cb)
    assert torch.equal(ca, cb)
