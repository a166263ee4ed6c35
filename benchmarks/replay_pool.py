"""Replay recorded Mixtral routing through the per-layer cache and the one pool for every layer, at equal bytes.

    python benchmarks/replay_pool.py ../shared/data/routing/mixtral-8x7b-instruct/*-decode.jsonl \
        --experts-per-layer 2 3 4 5 6 [--spare 0 16] [--policies lru lfu] [--json]

Both caches are offload's own classes (offload/cache.py ExpertCache with K slots per layer,
offload/global_cache.py GlobalCache with N = layers x K + S slots, S in --spare: the slots a budget
between K and K + 1 per layer holds beside layers x K, which a per-layer cache leaves idle), driven in
the engine's call order: per token, layers in order; per layer step access() for its experts, then
place() each one that is not resident (the step's experts pinned), then tick(). A hit is a use
resident before its step (no prefetch).
Layers of one problem are interleaved by step index (a layer's dropped record shifts its later steps by
one: benchmarks/routing_traces.py reports the gaps); the prompt (prefill traces) warms the cache, uncounted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from routing_traces import Seq, read_trace  # noqa: E402

from offload.global_cache import make_cache  # noqa: E402

EXPERTS = 8


def problems(seqs: list[Seq]) -> list[dict[int, Seq]]:
    """Per (trace, problem): layer -> its sequence."""
    out: dict[tuple, dict[int, Seq]] = defaultdict(dict)
    for s in seqs:
        out[s.key[:2]][s.key[2]] = s
    return list(out.values())


def replay_problem(layers: dict[int, Seq], pool: str, k: int, policy: str, num_experts: int,
                   spare: int = 0) -> tuple[int, int]:
    """(hits, uses) of one problem's decode steps, every layer through one cache (K per layer or L x K + spare)."""
    n = max(layers) + 1
    cache = make_cache(pool, n, num_experts, k if pool == "layer" else n * k + spare, 1, "cpu", policy)
    steps = {layer: s.prefill + s.decode for layer, s in layers.items()}
    warm = {layer: len(s.prefill) for layer, s in layers.items()}
    hits = uses = 0
    for t in range(max(len(v) for v in steps.values())):
        for layer in sorted(steps):
            if t >= len(steps[layer]):
                continue
            ids = steps[layer][t]
            for e in ids:
                cache.access(layer, e)
            pinned = {(layer, e) for e in ids}
            for e in ids:
                hit = cache.slot_of(layer, e) is not None
                if not hit:
                    cache.place(layer, e, pinned)
                if t >= warm[layer]:
                    hits, uses = hits + hit, uses + 1
            cache.tick(layer)
    return hits, uses


def replay(seqs: list[Seq], ks: list[int], policies: list[str], spares: list[int],
           num_experts: int = EXPERTS) -> dict:
    """{policy: {"layer" | "global+S": {K: hit rate}}} over every problem of `seqs`."""
    out: dict = {}
    pools = [("layer", 0)] + [("global", s) for s in spares]
    for policy in policies:
        for pool, spare in pools:
            name = pool if pool == "layer" else f"global+{spare}"
            for k in ks:
                h = u = 0
                for layers in problems(seqs):
                    dh, du = replay_problem(layers, pool, k, policy, num_experts, spare)
                    h, u = h + dh, u + du
                out.setdefault(policy, {}).setdefault(name, {})[str(k)] = h / max(u, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--experts-per-layer", type=int, nargs="+", default=[2, 3, 4, 5, 6], metavar="K")
    p.add_argument("--policies", nargs="+", default=["lru", "lfu"], choices=["lru", "lfu"])
    p.add_argument("--spare", type=int, nargs="+", default=[0, 16], metavar="S",
                   help="pool slots beyond layers x K (default 0 16: half a slot per layer of Mixtral)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    results = {}
    for path in a.traces:
        seqs, _ = read_trace(path)
        results[os.path.basename(path)] = replay(seqs, a.experts_per_layer, a.policies, a.spare)
    if a.json:
        print(json.dumps(results, indent=2))
        return results
    for name, res in results.items():
        print(name)
        print("  policy pool       " + "".join(f"  K={k:<5}" for k in a.experts_per_layer))
        for policy, by_pool in res.items():
            for pool, row in by_pool.items():
                print(f"  {policy:<6} {pool:<10} " + "".join(f"  {row[str(k)]:.3f}  " for k in a.experts_per_layer))
    return results


if __name__ == "__main__":
    main()
