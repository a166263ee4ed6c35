"""benchmarks/gpu_check.py: exits 0 without a GPU; its device-agnostic parts run on the CPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run for minutes")
def test_without_a_gpu_it_says_so_and_exits_0():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "no CUDA device" in out.stdout


def test_parts_run_on_the_cpu(monkeypatch):
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    rows = gpu_check.shipped(3)
    assert list(rows) == ["K=8 resident", "K=4 ram", "K=4 mmap"] and all(r["same_ids"] for r in rows.values())
    assert rows["K=4 ram"]["hit_rate"] is not None
    ms = gpu_check.expert_ms(repeats=1, shapes={"tiny": (128, 64)})
    assert {"tiny bf16", "tiny 4-bit dequant", "tiny 4-bit fused", "tiny 2-bit dequant"} <= set(ms)
    hybrid = gpu_check.hybrid(3)  # on the CPU device auto copies (both paths share the cores)
    assert all(r["same_ids_as_copy"] for r in hybrid.values()) and hybrid["K=2 cpu"]["copies"] == 0
    assert hybrid["K=2 cpu"]["cpu_runs"] > 0 == hybrid["K=2 auto"]["cpu_runs"]
    text = gpu_check.table({"device": "cpu", "torch": torch.__version__, "shipped": rows, "experts": ms,
                            "sweep": {"error": "skipped"}, "hybrid": hybrid})
    assert "| K=4 mmap |" in text and "tiny 2-bit fused" in text and "| K=2 cpu |" in text
