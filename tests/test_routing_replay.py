"""benchmarks/routing_replay.py: the experts provider is asked for the trace's ids and weights, token by
token and layer by layer, by the eager step and the static (device-routed) step alike; gaps; mismatches."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from test_static_step import static_greedy
from test_table_engine import engine as table_engine
from test_table_engine import store as table_store  # noqa: F401  (fixture)

from mixtral_lite.generation.decode import generate
from mixtral_lite.model.config import ModelConfig
from mixtral_lite.model.transformer import Transformer
from mixtral_lite.runtime.load import load_model

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("routing_replay", ROOT / "benchmarks" / "routing_replay.py")
routing_replay = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = routing_replay
spec.loader.exec_module(routing_replay)
RoutingReplay = routing_replay.RoutingReplay
REAL = ROOT.parent / "shared" / "data" / "routing" / "mixtral-8x7b-instruct" / "humaneval-decode.jsonl"


class Recorder:
    """Wraps an experts provider and keeps what each call asked it for: (layer, ids, weights) per call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def run(self, layer, x, ids, weights, next_guess=None):
        self.calls.append((layer, ids.tolist(), weights.tolist()))
        return self.inner.run(layer, x, ids, weights, next_guess if self.inner.wants_guess else None)

    def run_device(self, layer, x, ids, weights, residual, out):
        self.calls.append((layer, ids.tolist(), weights.tolist()))
        return self.inner.run_device(layer, x, ids, weights, residual, out)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class NoExperts:
    """A provider that computes nothing (only the routing is looked at)."""

    wants_guess = False

    def run(self, layer, x, ids, weights, next_guess=None):
        return torch.zeros_like(x)

    def stats(self):
        return {}


def write_trace(path: Path, layers: list[list[list[int]]], token_idx: bool = True) -> Path:
    """layers[l] = layer l's top-2 per recorded token; weights differ per record, so they are checked too."""
    rows = []
    for layer, steps in enumerate(layers):
        for t, ids in enumerate(steps):
            p = round(0.5 + 0.01 * ((t + layer) % 40 + 1), 2)
            rec = {"dataset": "synthetic", "problem_id": 3, "layer": layer, "experts": ids, "gating_probs": [p, 1 - p]}
            rec["token_idx" if token_idx else "token_pos"] = t if token_idx else 0
            rows.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trace_records(path: Path, problem: int) -> dict[int, list[dict]]:
    """Each layer's records in token order, read independently of the module under test."""
    out = defaultdict(list)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["problem_id"] == problem:
            out[r["layer"]].append(r)
    return {k: sorted(v, key=lambda r: r.get("token_idx", 0)) for k, v in out.items()}


def expected_calls(records: dict[int, list[dict]], rows_per_call: list[int], n: int) -> list[tuple]:
    """Rows of a call take consecutive trace tokens; each layer replays its own records; wrap at n."""
    out, start = [], 0
    for rows in rows_per_call:
        for layer in range(len(records)):
            toks = [(start + r) % n for r in range(rows)]
            out.append((layer, [records[layer][t]["experts"] for t in toks],
                        [torch.tensor(records[layer][t]["gating_probs"]).tolist() for t in toks]))
        start += rows
    return out


def random_routes(layers: int, tokens: int, experts: int, seed: int) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randperm(experts, generator=gen)[:2].tolist() for _ in range(tokens)] for _ in range(layers)]


def test_eager_steps_ask_for_the_traces_ids_and_weights_with_a_gap_and_a_wrap(mixtral_ref, tmp_path, capsys):
    _, path = mixtral_ref
    routes = random_routes(3, 12, 4, seed=1)
    routes[1] = routes[1][:7] + routes[1][8:]  # layer 1 lost a record: 11 tokens, its later ones shift by one
    trace = write_trace(tmp_path / "t.jsonl", routes)
    model = load_model(path)
    replay = RoutingReplay.from_trace(trace).install(model)
    assert "is not the model's" in capsys.readouterr().err
    assert (replay.n, replay.gaps, replay.dropped) == (11, 1, 2)  # layers 0 and 2 lose their 12th token
    model.experts = rec = Recorder(model.experts)
    generate(model, [[1, 415, 2936, 9060]], 10, window=64)  # 4 prompt rows + 9 steps = 13 tokens: wraps at 11
    assert rec.calls == expected_calls(trace_records(trace, 3), [4] + [1] * 9, 11)
    routing_replay.uninstall(model)
    rec.calls.clear()
    generate(model, [[1, 415, 2936, 9060]], 2, window=64)
    assert rec.calls != expected_calls(trace_records(trace, 3), [4, 1], 11)  # the model's own routing again


def test_static_steps_ask_for_the_traces_ids(table_store, tmp_path):  # noqa: F811
    model = load_model(table_store, dtype=torch.bfloat16, experts=lambda *a: table_engine(table_store, 2))
    routes = random_routes(model.config.num_layers, 9, model.config.num_experts, seed=2)
    routes[2] = routes[2][:3] + routes[2][4:]
    trace = write_trace(tmp_path / "t.jsonl", routes)
    RoutingReplay.from_trace(trace).install(model, quiet=True)
    model.experts = rec = Recorder(model.experts)
    static_greedy(model, [[1, 415, 2936]], 6, 64)  # an eager 3-row prefill, then 5 static steps (run_device)
    assert rec.calls == expected_calls(trace_records(trace, 3), [3] + [1] * 5, 8)
    assert model.experts.stats()["expert_hits"] + model.experts.stats()["expert_misses"] > 0  # the engine ran


@pytest.mark.skipif(not REAL.is_file(), reason="the shared routing traces are not here")
def test_the_real_trace_replays_record_by_record_on_a_32_layer_model(capsys):
    cfg = ModelConfig.from_dict({"architectures": ["MixtralForCausalLM"], "vocab_size": 64, "hidden_size": 16,
                                 "intermediate_size": 8, "num_hidden_layers": 32, "num_attention_heads": 2,
                                 "num_key_value_heads": 1, "num_local_experts": 8, "num_experts_per_tok": 2,
                                 "max_position_embeddings": 512})
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.experts = rec = Recorder(NoExperts())
    records = trace_records(REAL, 1)
    counts = {len(v) for v in records.values()}
    assert min(counts) < max(counts)  # problem 1 has layers with gaps (the recorder's 0.5/0.5 drops)
    replay = RoutingReplay.from_trace(REAL).install(model, quiet=True)
    assert replay.problem == 1 and replay.n == min(counts)
    assert replay.gaps == sum(max(counts) - len(v) for v in records.values())
    with torch.inference_mode():
        cache = model.new_cache(1, 64)
        cache.reset()
        model(torch.tensor([[1, 2, 3]]), cache)
        for t in range(4):
            model(torch.tensor([[t]]), cache)
    assert rec.calls == expected_calls(records, [3, 1, 1, 1, 1], replay.n)
    assert {c[0] for c in rec.calls} == set(range(32))


def test_a_layer_count_mismatch_is_one_line_naming_the_file(mixtral_ref, tmp_path):
    _, path = mixtral_ref
    model = load_model(path)  # 3 layers, 4 experts
    trace = write_trace(tmp_path / "two.jsonl", random_routes(2, 5, 4, seed=3))
    with pytest.raises(SystemExit) as e:
        RoutingReplay.from_trace(trace).install(model)
    assert str(e.value) == f"{trace}: routing recorded for 2 layers, the model has 3; a replay needs the same count"
    trace = write_trace(tmp_path / "eight.jsonl", [[[7, 0]] * 4] * 3)
    with pytest.raises(SystemExit, match=r"eight.jsonl: expert id 7 recorded, the model has 4 experts$"):
        RoutingReplay.from_trace(trace).install(model)
    assert all(b.moe.replay is None for b in model.layers)  # nothing installed by a refused trace


def test_token_pos_traces_replay_in_file_order(tmp_path):
    routes = random_routes(2, 6, 8, seed=4)
    replay = RoutingReplay.from_trace(write_trace(tmp_path / "p.jsonl", routes, token_idx=False))
    assert replay.ids.tolist() == routes
