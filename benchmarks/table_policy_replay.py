"""The table engine's admission rule on real Mixtral-8x7B routing: hit rate, bus bytes and the bus-bound rate.

    python benchmarks/table_policy_replay.py [TRACE.jsonl ...] [--slots 2 3 4] [--bus-gbps 47]
    # -> benchmarks/results/table_policy_replay.json (rows and assumptions) and a markdown table

Replays ../shared/data/routing/ traces (top-2 of 8 experts per token and layer, recorded from Mixtral-8x7B-
Instruct; a gap, where the recorder dropped a 0.5/0.5 tie, repeats the layer's previous choice) through the
rule offload/table.py applies after each step, per layer with K slots:

    admit-all   every miss of step t is copied into a slot (LRU victim), readable from step t + 1
    gated       a miss is admitted into a free slot, or over the LRU victim only when it has been used more
                often (what TableEngine does now)

A use of an expert not in a slot is read in place over the bus (one expert's bytes); an admission copies one
expert's bytes too. The bus-bound rate is tokens per second if the bus did nothing else:
bus GB/s / (bytes per token). The H200 measured 47 GB/s for the kernels' in-place reads (gpu_check.json) and
admitting every miss at K=2 hit 0.13 there (the table was then updated a step later than modelled here).
This is a projection from measured costs, not a measurement: it leaves out the device's own time per token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "data" / "routing" / "mixtral-8x7b-instruct"
EXPERT_BYTES = 99_090_432  # one Mixtral-8x7B expert, 4-bit g64, int4-rows layout (gpu_check.json)


def problems(path: Path) -> dict[tuple[str, int], list[list[list[int]]]]:
    """(dataset, problem) -> steps -> layers -> the two experts, gaps filled with the previous step's choice."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict = {}
    for r in rows:
        by.setdefault((r["dataset"], r["problem_id"]), {}).setdefault(r["token_idx"], {})[r["layer"]] = r["experts"]
    out = {}
    for key, steps in by.items():
        layers = 1 + max(layer for s in steps.values() for layer in s)
        prev, seq = [[0, 1]] * layers, []
        for t in range(max(steps) + 1):
            prev = [steps.get(t, {}).get(layer, prev[layer]) for layer in range(layers)]
            seq.append(prev)
        out[key] = seq
    return out


def replay(seq: list[list[list[int]]], k: int, gated: bool) -> dict:
    layers = len(seq[0])
    slots = [set() for _ in range(layers)]
    planned = [set() for _ in range(layers)]
    uses, recent = [Counter() for _ in range(layers)], [[] for _ in range(layers)]
    hits = misses = copies = 0
    for step in seq:
        slots = [set(p) for p in planned]  # what the previous step's admissions made readable
        for layer, chosen in enumerate(step):
            for e in chosen:
                hits += e in slots[layer]
                misses += e not in slots[layer]
                uses[layer][e] += 1
                if e in recent[layer]:
                    recent[layer].remove(e)
                recent[layer].append(e)
            plan = planned[layer]
            for e in chosen:
                if e in plan:
                    continue
                if len(plan) < k:
                    plan.add(e)
                    copies += 1
                    continue
                victims = [v for v in recent[layer] if v in plan and v not in chosen]
                if not victims or (gated and uses[layer][e] <= uses[layer][victims[0]]):
                    continue
                plan.discard(victims[0])
                plan.add(e)
                copies += 1
    n = len(seq)
    return {"hit_rate": hits / (hits + misses), "misses_per_token": misses / n, "copies_per_token": copies / n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="*", type=Path,
                   default=[TRACES / "humaneval-decode.jsonl", TRACES / "gsm8k-decode.jsonl"])
    p.add_argument("--slots", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--bus-gbps", type=float, default=47.0, help="in-place read rate over the bus (H200: 47)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "table_policy_replay.json")
    a = p.parse_args(argv)
    rows = []
    for path in a.traces:
        for (dataset, problem), seq in problems(path).items():
            for k in a.slots:
                for gated in (False, True):
                    r = replay(seq, k, gated)
                    gb = (r["misses_per_token"] + r["copies_per_token"]) * EXPERT_BYTES / 1e9
                    rows.append({"dataset": dataset, "problem": problem, "tokens": len(seq), "slots": k,
                                 "rule": "gated" if gated else "admit-all", **r, "gb_per_token": gb,
                                 "bus_bound_tok_s": a.bus_gbps / gb})
    assumptions = (f"expert {EXPERT_BYTES / 1e6:.1f} MB (4-bit g64 rows layout), bus {a.bus_gbps} GB/s (in-place "
                   "reads and copies alike), per-layer slots, the device's own time left out")
    print(f"assumptions: {assumptions}", file=sys.stderr)
    print("| trace | K | rule | hit rate | misses/token | copies/token | GB/token | bus-bound tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} {r['problem']} ({r['tokens']} tokens) | {r['slots']} | {r['rule']} | "
              f"{r['hit_rate']:.3f} | {r['misses_per_token']:.1f} | {r['copies_per_token']:.1f} | "
              f"{r['gb_per_token']:.2f} | {r['bus_bound_tok_s']:.1f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name(a.out.name + ".tmp")
    tmp.write_text(json.dumps({"assumptions": assumptions, "projection": True, "rows": rows}, indent=1))
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
