"""A PROJECTION (not a measurement) of Mixtral-8x7B decode tokens/s on a described GPU desktop, under
three designs, from the real routing traces replayed through offload's own LRU cache:

    copy-only   every miss is copied into a slot over PCIe (mixtral-lite before issue 14)
    hybrid      the engine's own scheduler (offload.miss_policy.MissPolicy, mode auto) decides per layer
                how many misses to copy and how many to run on the CPU beside the host store, each copy
                credited with the later hits admissions have been measured to bring (AdmissionValue);
                CPU-run experts are not admitted (as in the engine)
    llama.cpp   every expert on the CPU, attention and the rest on the GPU (--n-cpu-moe / -ot exps=CPU)

    python benchmarks/project_gpu.py [TRACE ...] [--preset rtx3060-ddr4 rtx4070-ddr5] [--quick] [--json]

Per layer and decode token (seconds): dense = dense bytes per layer / (GPU GB/s x efficiency) + overhead;
gpu = expert bytes / (GPU GB/s x efficiency); copy = expert bytes / PCIe GB/s; cpu = expert bytes /
min(threads x per-core GB/s, DRAM GB/s x efficiency), the per-core figure measured on this project's
machine (benchmarks/README.md, bench_fused: torch's CPU int4 kernel). While a copy runs, the DMA reads
the same DRAM: a CPU run gets min(threads x per-core, DRAM x efficiency - PCIe) GB/s until the layer's
copies end, its full rate after (`--no-contention` to drop this). Layer time = dense +
offload.miss_policy.layer_time(hits, misses, copies). No prefetch (the traces carry no hidden states to
guess from), so copy-only and hybrid are both conservative. Every figure is a flag, and all are printed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from replay_routing import BW_EFFICIENCY, DENSE_WEIGHTS, EXPERTS, LAYER_OVERHEAD_S, LAYERS, admit  # noqa: E402
from routing_traces import problem_lengths, read_trace  # noqa: E402

from mixtral_lite.runtime.flags import live_policies  # noqa: E402
from offload.miss_policy import Costs, MissPolicy, layer_time  # noqa: E402  (the engine's own scheduler)
from offload.policy import make_policy  # noqa: E402

TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "routing",
                      "mixtral-8x7b-instruct")
MIB, GIB = 1024**2, 1024**3
# name: GPU GB/s, GPU GiB, PCIe GB/s effective, DRAM GB/s peak, CPU threads for the experts
PRESETS = {
    "rtx3060-ddr4": dict(gpu_gbps=360.0, gpu_gib=12.0, pcie_gbps=25.0, dram_gbps=51.2, threads=8),
    "rtx4070-ddr5": dict(gpu_gbps=504.0, gpu_gib=12.0, pcie_gbps=25.0, dram_gbps=96.0, threads=8),
}
LLAMA_CPP_PUBLISHED = 5.26  # RTX 3060 + i7-12700K, Q4_K_M, 10 of 33 layers on the GPU (issue 14)


def costs(a, preset: dict) -> tuple[Costs, float]:
    """(per-expert Costs, dense seconds per layer)."""
    eff_gpu = preset["gpu_gbps"] * 1e9 * BW_EFFICIENCY
    eb = a.expert_mib * MIB
    dram = preset["dram_gbps"] * a.dram_efficiency * 1e9
    cpu_bw = min(preset["threads"] * a.core_gbps * 1e9, dram)
    shared = min(preset["threads"] * a.core_gbps * 1e9, max(dram - preset["pcie_gbps"] * 1e9, 1e9))
    dense = DENSE_WEIGHTS * a.dense_bits / 8 / LAYERS / eff_gpu + LAYER_OVERHEAD_S
    c = Costs(copy=eb / (preset["pcie_gbps"] * 1e9), cpu=eb / cpu_bw, gpu=eb / eff_gpu,
              cpu_beside_copy=eb / shared if a.contention else None)
    return c, dense


def slots_per_layer(a, preset: dict) -> list[int]:
    """K per layer from the GPU's memory: what dense weights and a reserve leave, spread over the layers."""
    free = preset["gpu_gib"] * GIB - DENSE_WEIGHTS * a.dense_bits / 8 - a.reserve_gib * GIB
    total = min(int(free // (a.expert_mib * MIB)), LAYERS * EXPERTS)
    if total < 2 * LAYERS:
        raise SystemExit(f"{preset}: fewer than 2 slots per layer fit")
    return [total // LAYERS + (layer < total % LAYERS) for layer in range(LAYERS)]


def replay_layer(steps: list[list[int]], layer: int, k: int, warm: int, misses: MissPolicy,
                 c: Costs, cache_policy: str = "lru") -> tuple[float, int, int]:
    """(seconds, hits, uses) of one layer's decode steps under `misses` (the engine's calls, in its order);
    the first `warm` steps (the prompt) copy every miss and are not timed."""
    policy, resident, total, hits, uses = make_policy(cache_policy, EXPERTS, k), set(), 0.0, 0, 0
    for t, ids in enumerate(steps):
        misses.value.used(layer, set(ids))
        for e in ids:
            policy.access(e)
        missed = [e for e in ids if e not in resident]
        copies, optional = (len(missed), 0) if t < warm else misses.plan(len(ids) - len(missed), len(missed))
        if t >= warm:
            total += layer_time(len(ids) - len(missed), len(missed), copies, c)
            hits, uses = hits + len(ids) - len(missed), uses + len(ids)
        for i, e in enumerate(missed[:copies]):  # the engine copies the first ones, the rest run on the CPU
            victim = admit(policy, resident, e, ids, k)
            if victim is not None:
                misses.value.evicted(layer, victim)
            if i >= copies - optional:
                misses.value.admitted(layer, e, None if victim is None else (layer, victim))
        policy.tick()
    misses.value.settle()  # each replayed sequence starts with an empty cache
    return total, hits, uses


def project(seqs, a, preset: dict) -> dict:
    c, dense = costs(a, preset)
    ks = slots_per_layer(a, preset)
    full = problem_lengths(seqs, by_trace=True)
    tokens = sum(full.values())
    out, hit_rate, value = {}, {}, None
    for name, misses in {"copy-only": MissPolicy("copy"), "hybrid": MissPolicy("auto", c)}.items():
        secs, hits, uses = 0.0, 0, 0
        for s in seqs:
            t, h, u = replay_layer(s.prefill + s.decode, s.key[2], ks[s.key[2]], len(s.prefill), misses, c,
                                   a.cache_policy)
            secs += (t + dense * len(s.decode)) * full[s.key[:2]] / max(len(s.decode), 1)
            hits, uses = hits + h, uses + u
        out[name], hit_rate[name] = tokens / secs, hits / max(uses, 1)
        value = misses.value.per_admission()
    out["llama.cpp-style"] = 1 / (LAYERS * (dense + 2 * c.cpu + a.cpu_sync_ms / 1e3))
    return {"tokens_per_s": out, "hit_rate": hit_rate, "slots": f"{min(ks)}-{max(ks)} per layer ({sum(ks)} in all)",
            "ms_per_expert": {"copy": c.copy * 1e3, "cpu": c.cpu * 1e3,
                              "cpu_beside_copy": (c.cpu_beside_copy or c.cpu) * 1e3, "gpu": c.gpu * 1e3},
            "dense_ms_per_layer": dense * 1e3, "hybrid_net_hits_per_admission": value}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="*", help="routing jsonl (default: every trace in ../shared/data/routing)")
    p.add_argument("--preset", nargs="+", default=list(PRESETS), choices=sorted(PRESETS))
    p.add_argument("--expert-mib", type=float, default=89.6, help="packed 4-bit g64 Mixtral expert (MiB)")
    p.add_argument("--dense-bits", type=float, default=4.5, help="bits per dense weight on the GPU (Q4_K-like)")
    p.add_argument("--core-gbps", type=float, default=8.9,
                   help="packed GB/s one core's int4 kernel reads (measured here: benchmarks/README.md)")
    p.add_argument("--dram-efficiency", type=float, default=0.75, help="share of peak DRAM GB/s a kernel reaches")
    p.add_argument("--no-contention", dest="contention", action="store_false",
                   help="a CPU run beside a copy keeps its full DRAM bandwidth")
    p.add_argument("--cache-policy", choices=live_policies(), default="lru",
                   help="the engine's eviction policy (generate --cache-policy)")
    p.add_argument("--reserve-gib", type=float, default=1.5, help="GPU memory for KV cache, activations, CUDA")
    p.add_argument("--cpu-sync-ms", type=float, default=0.1, help="llama.cpp-style: per-layer GPU<->CPU handoff")
    for key in PRESETS["rtx3060-ddr4"]:
        p.add_argument(f"--{key.replace('_', '-')}", type=float, help=f"override every preset's {key}")
    p.add_argument("--quick", action="store_true", help="one trace, its first 40 decode steps")
    p.add_argument("--json", action="store_true", help="one JSON object as the last stdout line")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    paths = a.traces or sorted(glob.glob(os.path.join(TRACES, "*.jsonl")))
    paths = [p for p in paths if not p.endswith("-outputs.jsonl")][: 1 if a.quick else None]
    seqs = [s for p in paths for s in read_trace(p, 40 if a.quick else None)[0]]
    print(f"PROJECTION, not a measurement. Mixtral-8x7B decode, {a.cache_policy} expert cache, no prefetch.")
    print(f"traces: {', '.join(os.path.basename(p) for p in paths)}")
    print(f"assumptions: expert {a.expert_mib} MiB, dense {a.dense_bits} bits, GPU efficiency {BW_EFFICIENCY}, "
          f"{LAYER_OVERHEAD_S * 1e3} ms/layer overhead, CPU {a.core_gbps} GB/s per core, DRAM efficiency "
          f"{a.dram_efficiency}, DRAM contention {'on' if a.contention else 'off'}, reserve {a.reserve_gib} GiB, "
          f"llama.cpp-style handoff {a.cpu_sync_ms} ms/layer")
    result = {}
    for name in a.preset:
        preset = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in PRESETS[name].items()}
        r = project(seqs, a, preset) | {"machine": preset}
        result[name] = r
        tps = r["tokens_per_s"]
        print(f"\n{name}: {preset}\n  slots {r['slots']}; ms per expert "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["ms_per_expert"].items())
              + f"; dense {r['dense_ms_per_layer']:.2f} ms/layer; hybrid's measured net hits per admission "
              + f"{r['hybrid_net_hits_per_admission']:.2f}; hit rate "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["hit_rate"].items()))
        print("  tokens/s: " + ", ".join(f"{k} {v:.2f}" for k, v in tps.items())
              + f"  (hybrid / copy-only {tps['hybrid'] / tps['copy-only']:.2f}x, / llama.cpp published "
              f"{LLAMA_CPP_PUBLISHED}: {tps['hybrid'] / LLAMA_CPP_PUBLISHED:.2f}x)")
    if a.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
