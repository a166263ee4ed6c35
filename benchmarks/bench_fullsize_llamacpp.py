"""llama.cpp decoding a full-size Q4_0 GGUF from mmap: the same figures bench_fullsize.py takes of ours.

    python benchmarks/bench_fullsize_llamacpp.py GGUF [--threads 1 2] [--tokens 8] [--prompt-len 4] [--drop-caches]

Each thread count runs in its own process: llama-cpp-python (n_gpu_layers 0, use_mmap, n_threads and
n_threads_batch as given, n_ctx 512) loads GGUF, evaluates the prompt bench_fullsize.py uses, then
decodes --tokens greedy tokens (top_k 1, temperature 0) after one warm-up token. Per token: the time
between tokens coming out of `Llama.generate`, major faults and /proc/self/io read_bytes, as in
bench_fullsize.py; llama.cpp's own eval timings (llama_perf_context) are recorded too.

Weight repacking is off (`use_extra_bufts = False`): by default llama.cpp's CPU backend copies every
Q4_0 matrix into an interleaved anonymous buffer at load (q4_0_8x8 here), which for Mixtral-8x7B is
~25 GiB of RAM this machine does not have; off, the matrices are read in place from the mapped file.
Writes benchmarks/results/bench_fullsize_llamacpp.json (merged by (gguf, threads, repeat, label)).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fullsize import GIB, MIB, ROOT, child_result, counters, drop_page_cache, meminfo, rss_split  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "bench_fullsize_llamacpp.json"


def load(job: dict):
    import llama_cpp
    from bench_llamacpp import model_defaults

    with model_defaults(use_extra_bufts=job["repack"]):
        return llama_cpp.Llama(model_path=job["gguf"], n_gpu_layers=0, use_mmap=True, n_ctx=512,
                               n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)


def child(job: dict) -> dict:
    import llama_cpp

    cached0, c0 = meminfo("Cached"), counters()
    llm = load(job)
    c1, cached1, rss_load = counters(), meminfo("Cached"), rss_split()
    prompt = [1] + [(1000 + 37 * j) % 31997 + 3 for j in range(job["prompt_len"] - 1)]
    stamps, ids = [], []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        ids.append(int(tok))
        stamps.append(counters())
        if len(stamps) >= job["tokens"] + 1:  # as bench_fullsize: the prefill's token, a warm-up, tokens - 1 timed
            break
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    steps = [b["t"] - a["t"] for a, b in zip(stamps, stamps[1:], strict=False)]
    first, last, n = stamps[0], stamps[-1], len(steps)
    return {
        "tok_s": 1 / statistics.median(steps[1:]), "tok_s_mean": (n - 1) / (last["t"] - stamps[1]["t"]),
        "warmup_token_s": steps[0], "step_s": steps, "tokens": n, "ids": ids,
        "load_s": c1["t"] - c0["t"], "prefill_s": stamps[0]["t"] - c1["t"],
        "load_disk_gib": (c1["read"] - c0["read"]) / GIB,
        "rss_after_load": rss_load, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        **rss_split(), "mem_available_end_gib": meminfo("MemAvailable") / GIB,
        "cached_gib": {"before": cached0 / GIB, "loaded": cached1 / GIB, "end": meminfo("Cached") / GIB},
        "majflt_per_token": (last["majflt"] - first["majflt"]) / n,
        "disk_mib_per_token": (last["read"] - first["read"]) / n / MIB,
        "llama_perf": {"t_load_ms": perf.t_load_ms, "t_p_eval_ms": perf.t_p_eval_ms, "n_p_eval": perf.n_p_eval,
                       "t_eval_ms": perf.t_eval_ms, "n_eval": perf.n_eval},
        "load_average": os.getloadavg()}


def run_child(job: dict, timeout: float, drop: bool) -> dict:
    if drop:
        drop_page_cache()
    job = job | {"load_average_before": os.getloadavg()}
    r = child_result(__file__, job, timeout)
    r.pop("timed_out", None)
    return r if "error" in r else r | {"load_average_before": job["load_average_before"]}


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['threads']} | {r['error']} |"
    return (f"| {r['threads']} | {r['tok_s']:.3f} | {r['warmup_token_s']:.1f} | {r['peak_rss_gib']:.1f} "
            f"({r['rss_anon_gib']:.1f} / {r['rss_file_gib']:.1f}) | {r['cached_gib']['end']:.1f} | "
            f"{r['majflt_per_token']:.0f} | {r['disk_mib_per_token']:.0f} | {r['load_s']:.0f} | {r['prefill_s']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", nargs="?")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per thread count (each its own cold process)")
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--label", default="", help="a name for the conditions (rows are keyed by it too)")
    p.add_argument("--repack", action="store_true", help="keep llama.cpp's weight repacking (needs the model in RAM)")
    p.add_argument("--drop-caches", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    from mixtral_lite.runtime.runstats import write_json_atomic

    rows = json.loads(a.out.read_text())["rows"] if a.out.is_file() else []
    print("| thr | tok/s | warm-up s | peak RSS GiB (anon / file at end) | cached GiB (end) | maj faults/tok | "
          "disk MiB/tok | load s | prefill s |\n" + "|---" * 9 + "|", file=sys.stderr)
    for rep, t in [(rep, t) for rep in range(a.repeats) for t in a.threads]:  # thread counts take turns
        job = {"gguf": str(Path(a.gguf).resolve()), "threads": t, "tokens": a.tokens, "prompt_len": a.prompt_len,
               "repack": a.repack, "repeat": rep, "label": a.label}
        r = {**job, "gguf_gib": Path(a.gguf).stat().st_size / GIB, "drop_caches": a.drop_caches,
             **run_child(job, a.timeout, a.drop_caches)}
        key = (job["gguf"], t, rep, a.label)
        rows = [x for x in rows if (x["gguf"], x["threads"], x.get("repeat", 0), x.get("label", "")) != key] + [r]
        print(row(r), file=sys.stderr, flush=True)
        write_json_atomic(a.out, {"machine": f"{os.cpu_count()} cpus, {meminfo('MemTotal') / GIB:.1f} GiB",
                                  "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
