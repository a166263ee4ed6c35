"""benchmarks/replay_routing.py on small synthetic traces: gaps, prefill warm-up, --json."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "replay_routing.py"
spec = importlib.util.spec_from_file_location("replay_routing", SCRIPT)
replay_routing = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = replay_routing  # dataclasses look their module up there
spec.loader.exec_module(replay_routing)


def write_trace(path: Path, layers: dict[int, list[list[int]]], prefill: dict | None = None) -> Path:
    rows = []
    for layer, steps in layers.items():
        if prefill:
            rows += [
                {"problem_id": 0, "layer": layer, "token_pos": pos, "experts": ids, "gating_probs": [0.6, 0.4]}
                for pos, ids in prefill[layer]
            ]
        for t, ids in enumerate(steps):
            rec = {"dataset": "synthetic", "problem_id": 0, "layer": layer, "experts": ids, "gating_probs": [0.6, 0.4]}
            rec.update({"token_pos": 0} if prefill else {"token_idx": t})
            rows.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# layer 1 lost one record (a 0.5/0.5 step), so its token_idx run is one shorter
LAYERS = {0: [[0, 1], [0, 1], [2, 3], [2, 3], [0, 1]], 1: [[0, 1], [2, 3], [2, 3], [0, 1]]}


def test_gap_is_counted_and_layers_replay_on_their_own(tmp_path):
    seqs, gaps = replay_routing.read_trace(str(write_trace(tmp_path / "t.jsonl", LAYERS)))
    assert gaps["decode_gaps"] == 1 and gaps["aligned_layers"] == 1
    assert gaps["tokens_per_problem"] == {"0": 5}
    assert [len(s.decode) for s in seqs] == [5, 4]
    res = replay_routing.rates(replay_routing.replay(seqs, ["lru"], [2]))["lru"]["2"]
    # K=2 holds exactly one step: layer 0 misses 6 of 10, layer 1 misses 6 of 8
    assert res["hit_rate"] == pytest.approx(6 / 18)
    # misses/token: layer 0 6 misses in 5 tokens; layer 1 6 in 4 records, scaled to 5 tokens
    assert res["misses_per_token"] == pytest.approx((6 + 6 * 5 / 4) / 5)


def test_prefill_records_warm_the_cache_but_are_not_counted(tmp_path):
    prefill = {0: [(0, [4, 5]), (1, [0, 1]), (2, [4, 5])]}  # leading run of increasing token_pos
    path = write_trace(tmp_path / "p.jsonl", {0: [[0, 1], [4, 5]]}, prefill)
    seqs, gaps = replay_routing.read_trace(str(path))
    assert seqs[0].prefill == [[4, 5], [0, 1], [4, 5]] and seqs[0].decode == [[0, 1], [4, 5]]
    assert gaps["prefill_gaps"] == 0
    res = replay_routing.rates(replay_routing.replay(seqs, ["lru"], [4]))["lru"]["4"]
    assert res["hit_rate"] == 1.0  # all four experts were loaded during the prompt


def test_expert_bytes_at_mixtral_sizes():
    w = 3 * 4096 * 14336
    assert replay_routing.expert_bytes(16, 0) == w * 2
    assert replay_routing.expert_bytes(2, 16) == w // 4 + 2 * (w // 16) * 2
    assert replay_routing.expert_bytes(3, 128) == w * 3 // 8 + 2 * (w // 128) * 2


def test_json_last_line_has_the_documented_keys(tmp_path):
    path = write_trace(tmp_path / "t.jsonl", LAYERS)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), "--experts-per-layer", "2", "3", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last["policies"]) == {"lru", "lfu", "markov", "belady", "next-oracle"}
    assert set(last["policies"]["lru"]) == {"2", "3"}
    assert last["policies"]["belady"]["3"] >= last["policies"]["lru"]["3"]
    assert last["projection_is_measurement"] is False
    assert {"bytes_per_token", "misses_per_token", "gaps", "gap_handling", "projection", "published"} <= set(last)


def test_bad_record_and_bad_k_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem_id": 0, "layer": 0, "experts": [1, 2]}\n{"layer": 3}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not a routing record"):
        replay_routing.read_trace(str(bad))
    good = write_trace(tmp_path / "t.jsonl", LAYERS)
    r = subprocess.run(
        [sys.executable, str(SCRIPT), str(good), "--experts-per-layer", "1"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "--experts-per-layer [1]" in r.stderr
