"""Peak RSS and device bytes of mixtral-lite against generated length, K and store mode.

    python benchmarks/bench_memory.py [--length-model CKPT] [--k-model CKPT] [--quick] [--json]

1. Length: one process generates 16k tokens greedily (1k..16k checkpoints) with a 512-token
   rolling KV window and K = E/2 offloaded experts (ram store, prefetch on). At each
   checkpoint it records the current RSS (anonymous and file-backed), the peak RSS and the
   device bytes. Memory must stay flat: the growth from the first checkpoint to the last is
   compared with what an unbounded KV cache would have added over the same tokens.
2. K and store: each configuration (K = 2, 4, 6 and all 8 experts resident; ram and mmap
   stores) runs in a fresh process (peak RSS is per process), loads the model and generates
   64 tokens.

Models: synthetic random checkpoints written with tools/make_synthetic_checkpoint.py into
--workdir (reused across runs): for the length sweep a Mixtral-1/8-width model cut to 4
layers ("probe": its KV cache grows 4 KiB per token in float32 if unbounded, so a leak shows
within 16k tokens while decoding stays fast on a CPU), for the K/store sweep the full-depth
`mixtral-1/8` preset. --quick uses the `tiny` preset for both and 1k..2k tokens.

Device bytes: on CUDA the allocator's peak (torch.cuda.max_memory_allocated); on the CPU there
is no device allocator to ask, so the figure is mixtral_lite.runtime.runstats.device_bytes' account
of what the model placed on the "device" (parameters, KV ring, expert slot pool) and is
marked "accounted". Writes benchmarks/results/bench_memory.json and bench_memory.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = [1] + list(range(1000, 1031))  # 32 fixed token ids: the model is random, the text does not matter
PROBE = dict(vocab=32000, hidden=512, intermediate=1792, layers=4, heads=4, kv_heads=1, experts=8)


def memory_now() -> dict:
    """Current and peak RSS of this process, from /proc/self/status (bytes)."""
    fields = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "VmHWM": "peak_rss"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                out[fields[key]] = int(rest.split()[0]) * 1024
    return out


def synthetic(preset: str, workdir: Path) -> Path:
    """A synthetic checkpoint in workdir, written once (bfloat16 like Mixtral's; computed in float32)."""
    out = workdir / preset.replace("/", "-")
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.spec_from_file_location(
        "make_synthetic_checkpoint", ROOT / "tools" / "make_synthetic_checkpoint.py"
    )
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    if preset == "probe":
        tool.PRESETS.setdefault("probe", PROBE)  # not one of the tool's presets: registered here
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tool.write_checkpoint(out, preset, seed=0, dtype="bfloat16")
    print(f"wrote {out} ({preset}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def child(job: dict) -> dict:
    """Run one configuration in this process; return its memory samples."""
    import torch

    from mixtral_lite.generation.decode import generate_stream
    from mixtral_lite.model.kv_cache import kv_cache_bytes
    from mixtral_lite.runtime.load import load_model
    from mixtral_lite.runtime.offloading import make_factory
    from mixtral_lite.runtime.runstats import device_bytes

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    factory = None
    if job["k"] is not None:
        factory = make_factory(slots=job["k"], store=job["store"], prefetch=job["prefetch"])
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what users run on each
    model = load_model(job["model"], device=device, dtype=dtype, experts=factory)
    c = model.config
    kv_bytes = kv_cache_bytes(c, job["window"], dtype)
    after_load = {**memory_now(), "load_s": time.perf_counter() - t0}
    samples, marks, t0 = [], set(job["lengths"]), time.perf_counter()
    stream = generate_stream(model, [PROMPT], max(job["lengths"]), window=job["window"], temperature=0.0)
    for n, _ in enumerate(stream, 1):
        if n in marks:
            dev = (
                torch.cuda.max_memory_allocated(device)
                if device.type == "cuda"
                else device_bytes(model, kv_bytes, device)
            )
            samples.append({"tokens": n, **memory_now(), "device_bytes": dev, "elapsed_s": time.perf_counter() - t0})
    stats = model.experts.stats() if hasattr(model.experts, "stats") else {}
    return {
        **job,
        "after_load": after_load,
        "samples": samples,
        "kv_ring_bytes": kv_bytes,
        "kv_bytes_per_token_unbounded": kv_cache_bytes(c, 1, torch.float32),
        "device_measured": device.type == "cuda",
        "hit_rate": stats.get("hit_rate"),
        "expert_pool_bytes": stats.get("device_expert_bytes", 0),
    }


def run_child(job: dict) -> dict:
    """A fresh interpreter per configuration, so peak RSS belongs to that configuration alone."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"configuration {job} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def flatness(res: dict) -> dict:
    """Growth of anonymous RSS over the sweep against an unbounded KV cache's growth."""
    first, last = res["samples"][0], res["samples"][-1]
    tokens = last["tokens"] - first["tokens"]
    grown = last["rss_anon"] - first["rss_anon"]
    unbounded = tokens * res["kv_bytes_per_token_unbounded"]
    return {
        "tokens": tokens,
        "rss_anon_growth_bytes": grown,
        "peak_rss_growth_bytes": last["peak_rss"] - first["peak_rss"],
        "device_growth_bytes": last["device_bytes"] - first["device_bytes"],
        "unbounded_kv_growth_bytes": unbounded,
        "flat": grown < 0.25 * unbounded and last["device_bytes"] == first["device_bytes"],
    }


def num_experts(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    return int(cfg.get("num_local_experts", 0))


def plan(a: argparse.Namespace) -> tuple[dict, list[dict]]:
    """The length job and the K/store jobs."""
    base = {"window": a.window, "threads": a.threads, "device": a.device, "prefetch": True}
    lm = a.length_model or synthetic("tiny" if a.quick else "probe", a.workdir)
    km = a.k_model or synthetic("tiny" if a.quick else "mixtral-1/8", a.workdir)
    lengths = [256, 512, 1024, 2048] if a.quick else [1024, 2048, 4096, 8192, 16384]
    e = num_experts(lm)
    length_job = {**base, "model": str(lm), "k": max(e // 2, 2) if e else None, "store": "ram", "lengths": lengths}
    ek = num_experts(km)
    ks = [k for k in a.ks if 2 <= k < ek] if ek else []
    n = [16] if a.quick else [64]
    jobs = [{**base, "model": str(km), "k": None, "store": "resident", "lengths": n}]
    jobs += [{**base, "model": str(km), "k": k, "store": s, "lengths": n} for s in ("ram", "mmap") for k in ks]
    return length_job, jobs


def plot(length: dict, configs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    toks = [s["tokens"] for s in length["samples"]]
    for key, label in (
        ("rss", "RSS"),
        ("rss_anon", "RSS anonymous"),
        ("peak_rss", "peak RSS"),
        ("device_bytes", "device bytes"),
    ):
        ax1.plot(toks, [s[key] / mib for s in length["samples"]], marker="o", label=label)
    ax1.set(
        xscale="log",
        xlabel="generated tokens (window 512)",
        ylabel="MiB",
        title=f"memory vs length ({Path(length['model']).name}, K={length['k']})",
    )
    ax1.legend()
    names = [f"{c['store']}\nK={c['k'] or 'all'}" for c in configs]
    x = range(len(configs))
    ax2.bar([i - 0.2 for i in x], [c["samples"][-1]["peak_rss"] / mib for c in configs], 0.4, label="peak RSS")
    ax2.bar([i + 0.2 for i in x], [c["samples"][-1]["device_bytes"] / mib for c in configs], 0.4, label="device bytes")
    ax2.set_xticks(list(x), names)
    ax2.set(ylabel="MiB", title=f"memory vs K and store ({Path(configs[0]['model']).name})")
    ax2.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def report(length: dict, flat: dict, configs: list[dict]) -> None:
    mib = 2**20
    dev_kind = "measured" if length["device_measured"] else "accounted"
    print(f"memory vs generated length: {Path(length['model']).name}, K={length['k']}, window {length['window']}")
    print(
        f"{'tokens':>8} {'RSS MiB':>9} {'anon MiB':>9} {'file MiB':>9} {'peak MiB':>9}"
        f" {'device MiB (' + dev_kind + ')':>24}"
    )
    for s in length["samples"]:
        print(
            f"{s['tokens']:>8} {s['rss'] / mib:>9.1f} {s['rss_anon'] / mib:>9.1f} {s['rss_file'] / mib:>9.1f} "
            f"{s['peak_rss'] / mib:>9.1f} {s['device_bytes'] / mib:>24.1f}"
        )
    print(
        f"flat: {flat['flat']} (anonymous RSS grew {flat['rss_anon_growth_bytes'] / mib:.1f} MiB over "
        f"{flat['tokens']} tokens; an unbounded KV cache would have grown "
        f"{flat['unbounded_kv_growth_bytes'] / mib:.1f} MiB; "
        f"device bytes grew {flat['device_growth_bytes']})"
    )
    print(f"\nmemory vs K and store: {Path(configs[0]['model']).name}, {configs[0]['lengths'][0]} tokens")
    print(
        f"{'store':<9}{'K':>4} {'peak RSS MiB':>13} {'anon MiB':>9} {'file MiB':>9} {'device MiB':>11}"
        f" {'pool MiB':>9} {'load s':>7}"
    )
    for c in configs:
        s = c["samples"][-1]
        print(
            f"{c['store']:<9}{c['k'] or 'all':>4} {s['peak_rss'] / mib:>13.1f} {s['rss_anon'] / mib:>9.1f} "
            f"{s['rss_file'] / mib:>9.1f} {s['device_bytes'] / mib:>11.1f} {c['expert_pool_bytes'] / mib:>9.1f} "
            f"{c['after_load']['load_s']:>7.1f}"
        )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length-model", type=Path, help="checkpoint for the length sweep (default: synthetic probe)")
    p.add_argument("--k-model", type=Path, help="checkpoint for the K/store sweep (default: synthetic mixtral-1/8)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6], help="experts per layer to compare")
    p.add_argument("--window", type=int, default=512, help="rolling KV window (tokens)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the machine is shared)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mixtral-lite-bench")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_memory[-quick].json)")
    p.add_argument("--quick", action="store_true", help="tiny model, 256..2048 tokens")
    p.add_argument("--json", action="store_true", help="print the JSON object as the last stdout line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return {}
    length_job, jobs = plan(a)
    length = run_child(length_job)
    configs = [run_child(j) for j in jobs]
    flat = flatness(length)
    report(length, flat, configs)
    out = {
        "benchmark": "memory",
        "machine": f"{platform.machine()} {platform.node()} {os.cpu_count()} cpus",
        "quick": a.quick,
        "length_sweep": length,
        "flatness": flat,
        "k_store": configs,
    }
    path = a.out or RESULTS / f"bench_memory{'-quick' if a.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)
    plot(length, configs, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    if a.json:
        print(json.dumps({k: out[k] for k in ("benchmark", "quick", "flatness")} | {"results": str(path)}))
    return out


if __name__ == "__main__":
    main()
