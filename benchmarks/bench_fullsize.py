"""Decoding a full-size (Mixtral-8x7B-shaped) store from mmap with K slots per layer: speed, memory, disk.

    python benchmarks/bench_fullsize.py STORE [STORE ...] -k K [K ...] [--threads 1 2] [--tokens 12]
                                        [--prompt-len 8] [--prefetch off|next] [--drop-caches] [--timeout 1800]
                                        [--trace ROUTING.jsonl]

Each (store, K, threads) runs in its own process: load the store (`--store mmap`, K slots per layer,
what `generate -m STORE --store mmap --experts-per-layer K` builds), prefill a short prompt, then decode
--tokens greedy tokens. The first decoded token is the warm-up; its time is reported apart. Recorded:

  tok_s              decode tokens/s after the warm-up token (median per-token time, and the mean rate)
  peak_rss_gib       ru_maxrss of the process; rss_*_gib the resident anon/file split after decoding
  cached_gib         /proc/meminfo Cached before the load, after it, and after decoding (the page cache)
  majflt_per_token   major page faults per decoded token (a fault that had to read the disk)
  disk_mib_per_token /proc/self/io read_bytes per decoded token (bytes the kernel read from disk for us)
  slot_mib_per_token the engine's slot fills per token (misses x packed expert size)

--trace: every MoE block routes as a recorded Mixtral-8x7B run did (benchmarks/routing_replay.py; the
generated text is then not the model's), so hit rates, slot fills and disk reads reflect real locality
rather than the synthetic weights' near-random routing; rows are keyed by the trace too.
--drop-caches writes 3 to /proc/sys/vm/drop_caches before each run (root only) so every run starts cold.
Writes benchmarks/results/bench_fullsize.json (merged by (store, K, threads)) and prints a markdown table;
run from a checkout whose package is on the path (PYTHONPATH=. where another checkout is installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "bench_fullsize.json"
GIB, MIB = 2**30, 2**20


def meminfo(key: str) -> int:
    """A /proc/meminfo field in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def rss_split() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024 / GIB
    return {"rss_gib": out.get("VmRSS"), "rss_anon_gib": out.get("RssAnon"), "rss_file_gib": out.get("RssFile")}


def counters() -> dict[str, float]:
    return {"t": time.perf_counter(), "majflt": resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
            "read": disk_read_bytes()}


def child(job: dict) -> dict:
    """One (store, K, threads) in this process."""
    import torch

    from mixtral_lite.generation.decode import generate_stream
    from mixtral_lite.runtime import offloading
    from mixtral_lite.runtime.load import load_model

    torch.set_num_threads(job["threads"])
    cached0 = meminfo("Cached")
    c0 = counters()
    factory = offloading.make_factory(slots=job["k"], store="mmap", prefetch=job["prefetch"] == "next")
    model = load_model(job["store"], experts=factory)
    replay = None
    if job.get("trace"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from routing_replay import RoutingReplay

        replay = RoutingReplay.from_trace(job["trace"]).install(model).summary()
    c1, cached1, rss_load = counters(), meminfo("Cached"), rss_split()
    prompt = [1] + [(1000 + 37 * j) % 31997 + 3 for j in range(job["prompt_len"] - 1)]
    stamps, ids = [], []
    out: dict = {}
    for step in generate_stream(model, [prompt], job["tokens"] + 1, window=512):
        ids.append(int(step[0]))
        stamps.append(counters())
        if len(stamps) >= 2:  # a run cut by the timeout still reports the tokens it finished
            load = {"load_s": c1["t"] - c0["t"], "prefill_s": stamps[0]["t"] - c1["t"], "rss_after_load": rss_load,
                    "load_disk_gib": (c1["read"] - c0["read"]) / GIB}
            out = summary(model, stamps, ids) | load | {"routing_replay": replay} | {"cached_gib": {
                "before": cached0 / GIB, "loaded": cached1 / GIB, "end": meminfo("Cached") / GIB}}
            Path(job["partial"]).write_text(json.dumps(out))
    return out


def summary(model, stamps: list[dict], ids: list[int]) -> dict:
    """Figures of the decoded tokens so far: stamps[0] is the prefill's token, the first step the warm-up."""
    steps = [b["t"] - a["t"] for a, b in zip(stamps, stamps[1:], strict=False)]
    first, last, n = stamps[0], stamps[-1], len(steps)
    timed, base = steps[1:] or steps, stamps[1] if len(stamps) > 2 else first
    s = model.experts.stats()
    return {
        "tok_s": 1 / statistics.median(timed), "tok_s_mean": len(timed) / (last["t"] - base["t"]),
        "warmup_token_s": steps[0], "step_s": steps, "tokens": n, "ids": ids,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, **rss_split(),
        "mem_total_gib": meminfo("MemTotal") / GIB, "mem_available_end_gib": meminfo("MemAvailable") / GIB,
        "majflt_per_token": (last["majflt"] - first["majflt"]) / n,
        "disk_mib_per_token": (last["read"] - first["read"]) / n / MIB,
        "slot_mib_per_token": (s.get("bytes_per_token") or 0) / MIB, "hit_rate": s.get("hit_rate"),
        "prefetch_recall": s.get("prefetch_recall"), "expert_mib": (s.get("expert_bytes") or 0) / MIB,
        "slots_total_mib": (s.get("device_expert_bytes") or 0) / MIB, "stall_s": s.get("stall_s"),
        "load_average": os.getloadavg()}


def drop_page_cache() -> None:
    """--drop-caches: write dirty pages back, then empty the page cache (needs root; else a warning)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        print(f"--drop-caches: {e} (runs start with whatever the page cache holds)", file=sys.stderr)


def child_result(script: str, job: dict, timeout: float) -> dict:
    """`script --child JOB` in its own process: its last stdout line as JSON, or {"error": ...}
    ({"timed_out": True} too when it ran past `timeout` seconds)."""
    try:
        r = subprocess.run([sys.executable, script, "--child", json.dumps(job)], capture_output=True, text=True,
                           timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", "timed_out": True}
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        return {"error": f"exit {r.returncode} {tail}".strip()}  # -9: the OOM killer
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_child(job: dict, timeout: float, drop: bool) -> dict:
    if drop:
        drop_page_cache()
    partial = Path(job["partial"])
    partial.unlink(missing_ok=True)
    r = child_result(__file__, job, timeout)
    if r.pop("timed_out", False):  # what the child had measured before it was stopped
        done = json.loads(partial.read_text()) if partial.is_file() else {}
        return done | r | {"partial": bool(done)}
    return r


def store_facts(path: str) -> dict:
    if Path(path).is_file():  # a GGUF (mixtral_lite/gguf): its experts' bytes, and the converted-experts file
        return gguf_facts(path)
    man = json.loads((Path(path) / "manifest.json").read_text())
    files = list(Path(path).glob("experts-*.safetensors"))
    return {"bits": man["experts"]["spec"]["bits"], "group": man["experts"]["spec"]["group_size"],
            "expert_store_gib": sum(f.stat().st_size for f in files) / GIB,
            "dense_gib": (Path(path) / "dense.safetensors").stat().st_size / GIB,
            "expert_mib_packed": man["experts"]["nbytes"] / MIB, "packing": man["experts"].get("packing", "hqq")}


def gguf_facts(path: str) -> dict:
    import torch

    from mixtral_lite.model.gguf.checkpoint import GGUFCheckpoint

    ckpt = GGUFCheckpoint(path)
    n = ckpt.config.num_layers * ckpt.config.num_experts
    types = sorted({t.name for layer in ckpt.types for t in layer.values()})
    side = ckpt.prepacked[0] if ckpt.prepacked else None
    return {"bits": 4, "group": 32, "packing": "gguf " + "/".join(types) + (" + converted file" if side else ""),
            "expert_store_gib": (side.stat().st_size if side else n * ckpt.layout.nbytes) / GIB,
            "gguf_gib": Path(path).stat().st_size / GIB, "dense_gib": ckpt.dense_device_bytes(torch.float32) / GIB,
            "expert_mib_packed": ckpt.expert_bytes / MIB}


def markdown(rows: list[dict]) -> str:
    out = ["| store | K | thr | tok/s | warm-up s | peak RSS GiB | cached GiB (end) | maj faults/tok | "
           "disk MiB/tok | slot fills MiB/tok | hit rate |", "|" + "---|" * 11]
    for r in rows:
        packing = r.get("packing", "hqq")
        prepacked = "" if packing == "hqq" else f", {packing}" if packing.startswith("gguf") else ", prepacked"
        name = f"{r['bits']}-bit g{r['group']}{prepacked} ({r['expert_store_gib']:.1f} GiB)"
        if "error" in r and "tok_s" not in r:
            out.append(f"| {name} | {r['k']} | {r['threads']} | {r['error']} |" + " |" * 7)
            continue
        out.append(f"| {name} | {r['k']} | {r['threads']} | {r['tok_s']:.3f} | {r['warmup_token_s']:.1f} | "
                   f"{r['peak_rss_gib']:.1f} | {r['cached_gib']['end']:.1f} | {r['majflt_per_token']:.0f} | "
                   f"{r['disk_mib_per_token']:.0f} | {r['slot_mib_per_token']:.0f} | "
                   + ("-" if r["hit_rate"] is None else f"{r['hit_rate']:.2f}") + " |")
    return "\n".join(out)


def row_key(r: dict) -> tuple:
    return r["store"], r["k"], r["threads"], r.get("repeat", 0), r.get("label", ""), r.get("trace") or ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stores", nargs="*")
    p.add_argument("-k", "--experts-per-layer", type=int, nargs="+", default=[2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--prefetch", choices=("off", "next"), default="next")
    p.add_argument("--repeats", type=int, default=1, help="runs per (store, K, threads), each its own cold process")
    p.add_argument("--label", default="", help="a name for the conditions (rows are keyed by it too)")
    p.add_argument("--drop-caches", action="store_true")
    p.add_argument("--trace", help="replay this real Mixtral routing trace (jsonl) instead of the router's choice")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=OUT, help="JSON results (merged with what it holds)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    import torch

    from mixtral_lite.runtime.runstats import write_json_atomic

    old = json.loads(a.out.read_text()) if a.out.is_file() else {"rows": []}
    rows = old["rows"]
    for store in a.stores:
        facts = store_facts(store)
        runs = [(rep, k, t) for rep in range(a.repeats) for k in a.experts_per_layer for t in a.threads]
        for rep, k, t in runs:  # a repeat comes after every setting has run once
            job = {"store": store, "k": k, "threads": t, "tokens": a.tokens, "prompt_len": a.prompt_len,
                   "prefetch": a.prefetch, "partial": str(a.out.with_suffix(".partial.json")), "trace": a.trace}
            r = {**job, **facts, **run_child(job, a.timeout, a.drop_caches), "drop_caches": a.drop_caches,
                 "repeat": rep, "label": a.label}
            key = (store, k, t, rep, a.label, a.trace or "")
            rows = [x for x in rows if row_key(x) != key] + [r]
            print(markdown([r]).splitlines()[-1], file=sys.stderr, flush=True)
            write_json_atomic(a.out, {"machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                                               f"{meminfo('MemTotal') / GIB:.1f} GiB, torch {torch.__version__}",
                                    "rows": rows})
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
