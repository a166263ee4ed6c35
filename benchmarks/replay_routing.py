"""Replay recorded Mixtral routing through offload's own eviction policies.

    python benchmarks/replay_routing.py ../shared/data/routing/mixtral-8x7b-instruct/*-decode.jsonl \
        --experts-per-layer 2 3 4 5 6 7 8 [--policies lru lfu markov belady] [--json] [--quick]

Input: jsonl, one record per (token, layer): {"problem_id", "layer", "experts": [top-1, top-2],
"gating_probs", and "token_idx" (decode traces) or "token_pos" (prefill-and-decode traces)}.

Cache model (the one offload/cache.py implements): every layer has K slots and its own policy
object built by offload.policy.make_policy. At each step the layer needs its top-2; the policy
sees access() for both, then each needed expert that is not resident is a miss and is loaded,
evicting policy.victim(resident experts not needed at this step); then tick(). K >= 2.

Traces and their gaps: benchmarks/routing_traces.py (each (trace, problem, layer) is replayed on
its own, in token order; a dropped record is a step that layer never saw, not a guessed one).

The tokens/s figures are a PROJECTION from the measured miss counts and stated assumptions
about the GPU, not a measurement: see project() and --help.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from routing_traces import Seq, problem_lengths, read_trace  # noqa: E402

from offload.policy import ONLINE, POLICIES, make_policy  # noqa: E402  (offload's code, not a copy)

# Mixtral-8x7B: one expert = w1, w3 [14336, 4096] + w2 [4096, 14336].
HIDDEN, FFN, LAYERS, EXPERTS, TOP_K = 4096, 14336, 32, 8, 2
EXPERT_WEIGHTS = 3 * HIDDEN * FFN
# Dense bytes read per token: attention (q, o 4096x4096; k, v 4096x1024), routers, lm_head.
DENSE_WEIGHTS = LAYERS * (HIDDEN * (2 * HIDDEN + 2 * 1024) + EXPERTS * HIDDEN) + 32000 * HIDDEN
QUANT = {
    "16-bit": (16, 0),
    "4-bit g64": (4, 64),
    "3-bit g64": (3, 64),
    "3-bit g128": (3, 128),
    "2-bit g16": (2, 16),
    "2-bit g32": (2, 32),
}
# name: (memory bandwidth GB/s, memory GB). Assumptions for all: 60% of peak bandwidth reached
# reading the resident weights, plus 0.25 ms per layer of launch/dequant/Python overhead.
GPUS = {"rtx3060": (360.0, 12), "t4": (320.0, 16), "rtx4090": (1008.0, 24), "a100": (1555.0, 40)}
BW_EFFICIENCY, LAYER_OVERHEAD_S = 0.6, 0.25e-3
PUBLISHED = {
    "source": "Eliseev & Mazur 2023 (mixtral-offloading, arXiv:2312.17238), 2-bit experts, "
    "LRU cache + speculative prefetch",
    "tokens_per_s": {"rtx3060": 2.28, "a100": 3.06},
}
GAP_POLICY = (
    "per (problem, layer) replay of its own records in token order; dropped 0.5/0.5 "
    "records are skipped, not guessed; misses/token extrapolated to the problem's length"
)


def expert_bytes(bits: int, group: int) -> int:
    """Weights at `bits` plus, per group, a 16-bit scale and a 16-bit zero (hqq's metadata)."""
    meta = 2 * (EXPERT_WEIGHTS // group) * 2 if group else 0
    return EXPERT_WEIGHTS * bits // 8 + meta


def admit(policy, resident: set[int], expert: int, keep, slots: int) -> int | None:
    """Put `expert` in the cache, evicting the policy's victim (never one of `keep`) when it is full;
    returns the victim (None: a free slot)."""
    victim = None
    if len(resident) >= slots:
        victim = policy.victim(sorted(resident.difference(keep)))
        policy.evict(victim)
        resident.remove(victim)
    resident.add(expert)
    policy.admit(expert)
    return victim


def simulate(policy, steps: list[list[int]], slots: int, warm: int = 0) -> tuple[int, int, int]:
    """(hits, accesses, misses) of one layer; the first `warm` steps run but are not counted."""
    resident: set[int] = set()
    hits = accesses = 0
    for t, ids in enumerate(steps):
        for e in ids:
            policy.access(e)
        for e in ids:
            hit = e in resident
            if not hit:
                admit(policy, resident, e, ids, slots)
            if t >= warm:
                hits, accesses = hits + hit, accesses + 1
        policy.tick()
    return hits, accesses, accesses - hits


def replay(seqs: list[Seq], policies: list[str], ks: list[int], num_experts: int = EXPERTS) -> dict:
    """Raw sums {policy: {K: [hits, accesses, extrapolated misses, tokens]}} over `seqs`."""
    full = problem_lengths(seqs, by_trace=True)
    tokens = sum(full.values())
    out: dict[str, dict[str, list]] = {}
    for name in policies:
        out[name] = {}
        for k in ks:
            sums = [0, 0, 0.0, tokens]
            for s in seqs:
                steps = s.prefill + s.decode
                kw = {} if name in ONLINE else {"future": steps}  # offline policies read the future
                h, a, m = simulate(make_policy(name, num_experts, k, **kw), steps, k, warm=len(s.prefill))
                sums[0], sums[1] = sums[0] + h, sums[1] + a
                sums[2] += m * full[s.key[:2]] / max(len(s.decode), 1)
            out[name][str(k)] = sums
    return out


def pool(results: list[dict]) -> dict:
    """Add the raw sums of several replays (same policies and K)."""
    first = results[0]
    return {n: {k: [sum(r[n][k][i] for r in results) for i in range(4)] for k in first[n]} for n in first}


def rates(sums: dict) -> dict:
    """{policy: {K: {"hit_rate", "misses_per_token"}}} from raw sums."""
    return {
        n: {k: {"hit_rate": h / max(a, 1), "misses_per_token": m / max(t, 1)} for k, (h, a, m, t) in row.items()}
        for n, row in sums.items()
    }


def project(
    misses_per_token: float,
    k: int,
    quant: str,
    gpu: str,
    pcie_gbps: float,
    compute_ms: float | None = None,
    dense_bits: int = 16,
) -> dict:
    """PROJECTED Mixtral-8x7B decode tokens/s: compute + miss transfers (serial) and overlapped bound."""
    bw, mem_gb = GPUS[gpu]
    eb = expert_bytes(*QUANT[quant])
    dense = DENSE_WEIGHTS * dense_bits // 8
    if compute_ms is None:
        read = dense + LAYERS * TOP_K * eb  # bytes the GPU reads per token
        compute = read / (bw * 1e9 * BW_EFFICIENCY) + LAYERS * LAYER_OVERHEAD_S
    else:
        compute = compute_ms / 1e3
    transfer = misses_per_token * eb / (pcie_gbps * 1e9)
    device = dense + LAYERS * k * eb
    return {
        "tokens_per_s": 1 / (compute + transfer),
        "tokens_per_s_overlapped": 1 / max(compute, transfer),
        "compute_ms": compute * 1e3,
        "transfer_ms": transfer * 1e3,
        "device_gb": device / 1e9,
        "fits": device / 1e9 + 0.5 <= mem_gb,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("traces", nargs="+", metavar="TRACE", help="routing jsonl file(s)")
    p.add_argument(
        "--experts-per-layer",
        "-k",
        type=int,
        nargs="+",
        default=[2, 3, 4, 5, 6, 7, 8],
        metavar="K",
        help="cache slots per layer (>= 2, the top-2 must fit)",
    )
    p.add_argument("--policies", nargs="+", default=list(POLICIES), help=f"from {sorted(POLICIES)}")
    p.add_argument("--num-experts", type=int, default=EXPERTS)
    p.add_argument(
        "--pcie-gbps",
        type=float,
        default=12.0,
        help="effective host->device GB/s (12: typical PCIe 3.0/4.0 x16 in practice)",
    )
    p.add_argument(
        "--gpu",
        nargs="+",
        default=["rtx3060", "a100"],
        choices=sorted(GPUS),
        help="GPU presets for the projection (bandwidth GB/s, memory GB): "
        + ", ".join(f"{g} {bw:.0f}/{m}" for g, (bw, m) in GPUS.items()),
    )
    p.add_argument("--compute-ms", type=float, help="per-token GPU compute time instead of the preset model")
    p.add_argument("--dense-bits", type=int, default=16, help="bits of the dense weights on the device")
    p.add_argument("--quick", action="store_true", help="first 48 decode steps per layer, K 2 4 8")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    a = p.parse_args(argv)
    if a.quick and a.experts_per_layer == p.get_default("experts_per_layer"):
        a.experts_per_layer = [2, 4, 8]
    bad = [k for k in a.experts_per_layer if not TOP_K <= k <= a.num_experts]
    if bad:
        p.error(f"--experts-per-layer {bad}: each K must be in {TOP_K}..{a.num_experts}")
    unknown = [n for n in a.policies if n not in POLICIES]
    if unknown:
        p.error(f"--policies {unknown}: choose from {sorted(POLICIES)}")
    return a


def _table(title: str, results: dict, ks: list[int], field: str, fmt: str) -> None:
    print(f"\n{title}")
    print(f"{'policy':<12}" + "".join(f"{'K=' + str(k):>8}" for k in ks))
    for name, row in results.items():
        print(f"{name:<12}" + "".join(format(row[str(k)][field], fmt).rjust(8) for k in ks))


def _print_gaps(gaps: dict) -> None:
    print(f"gaps: {GAP_POLICY}")
    for path, g in gaps.items():
        print(
            f"  {path}: {g['sequences']} layer sequences, {g['decode_records']} decode records, "
            f"{g['decode_gaps']} missing ({g['aligned_layers']} layers complete), prefill gaps "
            f"{g['prefill_gaps']}, decode tokens per problem {g['tokens_per_problem']}"
        )


def _print_bytes(pooled: dict, ks: list[int]) -> dict:
    """MB per token for each quantization setting; returns bytes/token."""
    out = {}
    print(f"\nhost->device MB per token (pooled; columns K={'/'.join(map(str, ks))}), Mixtral-8x7B experts:")
    for q, bg in QUANT.items():
        b = expert_bytes(*bg)
        out[q] = {n: {str(k): round(pooled[n][str(k)]["misses_per_token"] * b) for k in ks} for n in pooled}
        cells = "  ".join(f"{n} " + "/".join(f"{v / 1e6:.0f}" for v in out[q][n].values()) for n in pooled)
        print(f"  {q:<10} ({b / 2**20:5.1f} MiB/expert): {cells}")
    return out


def _print_projection(pooled: dict, ks: list[int], a: argparse.Namespace) -> dict:
    proj = {
        g: {
            q: {
                n: {
                    str(k): project(
                        pooled[n][str(k)]["misses_per_token"], k, q, g, a.pcie_gbps, a.compute_ms, a.dense_bits
                    )
                    for k in ks
                }
                for n in pooled
            }
            for q in QUANT
        }
        for g in a.gpu
    }
    gpu_model = (
        f"compute fixed at {a.compute_ms} ms/token"
        if a.compute_ms
        else f"compute = bytes read / ({BW_EFFICIENCY:.0%} of peak bandwidth) + {LAYER_OVERHEAD_S * 1e3} ms/layer"
    )
    print(
        f"\nPROJECTION, NOT A MEASUREMENT: Mixtral-8x7B decode tokens/s = 1 / (compute + misses x expert bytes"
        f" / {a.pcie_gbps} GB/s PCIe); no prefetch, no overlap; dense weights {a.dense_bits}-bit; {gpu_model};"
        f" * = device memory would not hold dense + 32 x K experts + 0.5 GB"
    )
    print(f"published, measured: {PUBLISHED['tokens_per_s']} tok/s ({PUBLISHED['source']})")
    for g in a.gpu:
        print(f"  {g:<10}{'':<12}" + "".join(f"{'K=' + str(k):>8}" for k in ks))
        for q in ("2-bit g16", "2-bit g32", "3-bit g64", "4-bit g64"):
            for n in pooled:
                cells = (proj[g][q][n][str(k)] for k in ks)
                print(
                    f"  {q:<10}{n:<12}"
                    + "".join(f"{c['tokens_per_s']:.2f}{'' if c['fits'] else '*'}".rjust(8) for c in cells)
                )
    return proj


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    ks, raw, gaps = a.experts_per_layer, {}, {}
    for path in a.traces:
        seqs, gaps[os.path.basename(path)] = read_trace(path, limit=48 if a.quick else None)
        raw[os.path.basename(path)] = replay(seqs, a.policies, ks, a.num_experts)
    per_trace = {p: rates(r) for p, r in raw.items()}
    pooled = rates(pool(list(raw.values())))
    _print_gaps(gaps)
    for path, res in per_trace.items():
        _table(f"decode hit rate, {path}", res, ks, "hit_rate", ".3f")
    if len(per_trace) > 1:
        _table("decode hit rate, all traces pooled", pooled, ks, "hit_rate", ".3f")
    _table("misses per token (all 32 layers), pooled", pooled, ks, "misses_per_token", ".2f")
    bytes_pt = _print_bytes(pooled, ks)
    proj = _print_projection(pooled, ks, a)

    def hits(res: dict) -> dict:
        return {n: {k: round(v["hit_rate"], 4) for k, v in row.items()} for n, row in res.items()}

    out = {
        "policies": hits(pooled),
        "per_trace": {p: hits(r) for p, r in per_trace.items()},
        "misses_per_token": {
            n: {k: round(v["misses_per_token"], 3) for k, v in row.items()} for n, row in pooled.items()
        },
        "bytes_per_token": bytes_pt,
        "expert_bytes": {q: expert_bytes(*bg) for q, bg in QUANT.items()},
        "gaps": gaps,
        "gap_handling": GAP_POLICY,
        "projection": proj,
        "projection_is_measurement": False,
        "published": PUBLISHED,
        "pcie_gbps": a.pcie_gbps,
        "quick": a.quick,
    }
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
