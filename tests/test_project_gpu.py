"""benchmarks/project_gpu.py on a small synthetic trace: the three designs order as the costs say."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import project_gpu  # noqa: E402


def trace(tmp_path) -> str:
    rng = random.Random(0)
    path = tmp_path / "t.jsonl"
    with open(path, "w") as f:
        for t in range(30):
            for layer in range(32):
                ids = rng.sample(range(8), 2)
                f.write(json.dumps({"problem_id": 0, "layer": layer, "experts": ids, "token_idx": t}) + "\n")
    return str(path)


def test_slow_pcie_favours_the_cpu_and_fast_pcie_the_copies(tmp_path, capsys):
    path = trace(tmp_path)
    slow = project_gpu.main([path, "--preset", "rtx3060-ddr4", "--pcie-gbps", "4", "--no-contention"])
    s = slow["rtx3060-ddr4"]["tokens_per_s"]
    assert s["hybrid"] > 1.5 * s["copy-only"] and s["hybrid"] >= s["llama.cpp-style"] * 0.99
    fast = project_gpu.main([path, "--preset", "rtx3060-ddr4", "--pcie-gbps", "400", "--threads", "1"])
    f = fast["rtx3060-ddr4"]["tokens_per_s"]
    assert abs(f["hybrid"] - f["copy-only"]) < 1e-9 * f["copy-only"]  # every miss copied
    assert "PROJECTION" in capsys.readouterr().out


def test_with_dram_contention_hybrid_keeps_a_cache_and_beats_both_designs(tmp_path):
    # the greedy split this replaced never copied here: its cache emptied and it fell below copy-only
    r = project_gpu.main([trace(tmp_path), "--preset", "rtx3060-ddr4"])["rtx3060-ddr4"]
    t = r["tokens_per_s"]
    assert t["hybrid"] > 1.2 * t["copy-only"] and t["hybrid"] > 1.2 * t["llama.cpp-style"]
    assert r["hit_rate"]["hybrid"] > 0.3 and 0 <= r["hybrid_net_hits_per_admission"] < 2
