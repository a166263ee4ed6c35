"""Decode speed of quantized weights on the fused kernels, beside our 16-bit run and llama.cpp's Q4_0/Q4_1.

    python benchmarks/bench_fused.py [--model {shipped,mixtral-1/8,mixtral-4l}|DIR] [--threads 1 2]
                                     [--tokens 32] [--repeats 3] [--method hqq|rtn] [--quick]

For one checkpoint (the presets are made with tools/make_synthetic_checkpoint.py into --workdir), this
makes, once per version of the checkpoint's files: our default 4-bit store (experts 4-bit g64 and
attention 4-bit g64 on the int4 kernel, lm_head and embeddings int8; tools/quantize_experts.py with
--method, rtn by default for mixtral-4l, where hqq's optimiser would take hours on this CPU), and, when
llama-cpp-python is installed, a GGUF f16 of the same weights (benchmarks/gguf_export.py) quantized by
llama.cpp itself to Q4_0 and Q4_1. Then, each in its own process, at each thread count, a short prompt
and --tokens greedy tokens, one warm-up and --repeats timed runs (median decode tok/s):

  ours 4-bit fused        the store, every expert cached, torch's fused int4/int8 kernels
  ours 4-bit dequant      the same store through the dequantize-then-multiply path (before the kernels)
  ours 16-bit             the checkpoint resident (fp32 where it fits, bf16 for mixtral-4l)
  ours 4-bit / 16-bit K=4 offloaded, 4 slots per layer, from RAM (mixtral-4l: 4-bit only, 4 tokens)
  ... prepacked           the same quantization stored in the CPU kernel's layout (quantize_experts.py
                          --prepack): resident experts read the mapped file in place, a miss is a copy
  llama.cpp Q4_0 / Q4_1

Writes benchmarks/results/bench_fused-<model>.json (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRESETS = ("mixtral-1/8", "mixtral-4l")
PROMPT_LEN = 32
Q_TYPES = {"Q4_0": 2, "Q4_1": 3}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_0 / _Q4_1


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{r.stderr[-2000:]}")


def checkpoint(name: str, workdir: Path) -> Path:
    from mixtral_lite import default_model_path

    if name == "shipped":
        return default_model_path()
    if name not in PRESETS:
        return Path(name)
    out = workdir / name.replace("/", "-")
    if not (out / "config.json").is_file():
        _run([sys.executable, str(ROOT / "tools" / "make_synthetic_checkpoint.py"), str(out), "--preset", name])
    return out


def store(src: Path, workdir: Path, method: str, prepack: bool = False) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generate_runners import source_stamp

    # a --prepack store holds this CPU capability's layout (read in place only under it): one per capability
    dst = workdir / f"{src.name}-{source_stamp(src)}-q4-{method}{f'-prepack-{capability()}' if prepack else ''}"
    if not (dst / "manifest.json").is_file():
        t0 = time.perf_counter()
        _run([sys.executable, str(ROOT / "tools" / "quantize_experts.py"), str(src), str(dst), "--bits", "4",
              "--method", method, "--device", "cpu", *(["--prepack"] if prepack else []),
              *(["--resume"] if dst.exists() else [])])
        print(f"quantized {src.name} ({method}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return dst


def capability() -> str:
    """The CPU capability torch dispatches to in this process and its children (ATEN_CPU_CAPABILITY lowers it)."""
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ggufs(src: Path, workdir: Path) -> dict[str, Path]:
    """llama.cpp Q4_0 and Q4_1 files of src ({} without llama-cpp-python)."""
    try:
        import ctypes

        import llama_cpp
    except ImportError:
        print("llama.cpp rows skipped: pip install llama-cpp-python", file=sys.stderr)
        return {}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from generate_runners import source_stamp

    base = workdir / f"{src.name}-{source_stamp(src)}"
    f16 = Path(f"{base}-f16.gguf")
    out = {q: Path(f"{base}-{q}.gguf") for q in Q_TYPES}
    if all(p.is_file() for p in out.values()):
        return out
    if not f16.is_file():
        _run([sys.executable, str(ROOT / "benchmarks" / "gguf_export.py"), str(src), str(f16), "--dtype", "f16"])
    for q, ftype in Q_TYPES.items():
        if not out[q].is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            tmp = out[q].with_name(out[q].name + ".tmp")
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise SystemExit(f"llama.cpp could not quantize {f16} to {q}")
            os.replace(tmp, out[q])
    f16.unlink()  # 2 bytes a weight: at mixtral-4l's size the largest file here, needed no more
    return out


def llama_cpp_build() -> str | None:
    """llama.cpp's own description of the CPU features it was built with (None without llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


def configurations(src: Path, q4: Path, pre: Path, gg: dict[str, Path], big: bool, dtype16: str) -> list[dict]:
    rows = [dict(label="ours 4-bit fused", path=str(q4), fused=True, dtype="float32"),
            dict(label="ours 4-bit fused, prepacked", path=str(pre), fused=True, dtype="float32"),
            dict(label="ours 4-bit fused (bf16 model)", path=str(q4), fused=True, dtype="bfloat16"),
            dict(label="ours 4-bit dequant", path=str(q4), fused=False, dtype="float32", short=big),
            dict(label="ours 16-bit", path=str(src), dtype=dtype16)]
    rows += [dict(label="ours 4-bit fused K=4", path=str(q4), fused=True, dtype="float32", slots=4, short=big),
             dict(label="ours 4-bit fused K=4, prepacked", path=str(pre), fused=True, dtype="float32", slots=4)]
    if not big:
        rows += [dict(label="ours 16-bit K=4", path=str(src), dtype=dtype16, slots=4)]
    rows += [dict(label=f"llama.cpp {q}", gguf=str(p)) for q, p in gg.items()]
    return rows


def child(job: dict) -> dict:
    """One configuration in this process: warm-up, then the timed runs."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_llamacpp import decode_rate, llama_engine
    from generate_runners import prompts

    from mixtral_lite.generation.decode import generate_stream
    from mixtral_lite.runtime import offloading
    from mixtral_lite.runtime.load import load_model
    from mixtral_lite.runtime.runstats import peak_rss_bytes

    torch.set_num_threads(job["threads"])
    prompt = prompts(1, 32000)[0][:PROMPT_LEN]
    n = 4 if job.get("short") else job["tokens"]
    t0 = time.perf_counter()
    notes, stats = {}, None
    if "gguf" in job:
        run = llama_engine(Path(job["gguf"]), prompt, n, 512, "f16", job["threads"], job.get("repack", True))
    else:
        factory = offloading.make_factory(slots=job["slots"], store="ram") if job.get("slots") else None
        model = load_model(job["path"], dtype=getattr(torch, job["dtype"]), experts=factory,
                           fused=job.get("fused", True))
        notes = getattr(model, "kernel_notes", {})

        def run() -> tuple[float, list[int]]:
            ids, stamps = [], []
            for step in generate_stream(model, [prompt], n + 1, window=512):
                ids.append(int(step[0]))
                stamps.append(time.perf_counter())
            return decode_rate(stamps), ids
    load_s = time.perf_counter() - t0
    run()  # warm-up
    rates, ids = [], None
    for _ in range(1 if job.get("short") else job["repeats"]):
        rate, ids = run()
        rates.append(rate)
    if "gguf" not in job and model.experts is not None:
        s = model.experts.stats()
        stats = {k: s.get(k) for k in ("hit_rate", "bytes_per_token", "expert_bytes")}
    return {"tok_s": statistics.median(rates), "rates": rates, "ids": ids, "tokens": n, "load_s": load_s,
            "peak_rss_mib": peak_rss_bytes() / 2**20, "kernels": notes, "offload": stats}


def run_child(job: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if r.returncode != 0:
        error = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        if r.returncode < 0 and job.get("repack"):  # killed by a signal inside llama.cpp
            error += " (llama.cpp died in native code: try --llama-no-repack)"
        return {"error": error}
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    threads = result["threads"]
    head = "| configuration | " + " | ".join(f"tok/s ({t} thr)" for t in threads)
    head += " | vs ours 16-bit | vs llama.cpp Q4_0 | load s | peak RSS MiB | kernels |"
    out = [head, "|" + "---|" * (len(threads) + 6)]
    by = {(r["label"], r["threads"]): r for r in result["rows"]}
    labels = list(dict.fromkeys(r["label"] for r in result["rows"]))
    for label in labels:
        cells, ratios16, ratiosq = [], [], []
        for t in threads:
            r = by[(label, t)]
            if "error" in r:
                cells.append("error")
                continue
            cells.append(f"{r['tok_s']:.2f}")
            for ref, acc in (("ours 16-bit", ratios16), ("llama.cpp Q4_0", ratiosq)):
                base = by.get((ref, t), {}).get("tok_s")
                acc.append(f"{r['tok_s'] / base:.2f}x" if base else "-")
        last = next((by[(label, t)] for t in threads if "error" not in by[(label, t)]), {})
        kern = ", ".join(f"{k}: {v}" for k, v in last.get("kernels", {}).items())
        out.append(f"| {label} | " + " | ".join(cells) + f" | {' / '.join(ratios16)} | {' / '.join(ratiosq)} "
                   f"| {last.get('load_s', 0):.1f} | {last.get('peak_rss_mib', 0):.0f} | {kern} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mixtral-1/8", help=f"shipped, one of {PRESETS}, or a checkpoint folder")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", choices=("hqq", "rtn"), help="quantization (default: rtn for mixtral-4l, else hqq)")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mixtral-lite-bench")
    p.add_argument("--only", nargs="+", metavar="LABEL", help="run only these configurations")
    p.add_argument("--quick", action="store_true", help="shipped model, 1 thread, 8 tokens, 1 repeat, no llama.cpp")
    p.add_argument("--llama-no-repack", action="store_true",
                   help="llama.cpp multiplies from the file's Q4 blocks instead of its repacked copy (its repacked "
                        "path crashed on a CPU reporting AMX); recorded in each llama.cpp row")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.quick:
        a.model, a.threads, a.tokens, a.repeats = "shipped", [1], 8, 1
    a.workdir.mkdir(parents=True, exist_ok=True)
    src = checkpoint(a.model, a.workdir)
    big = a.model == "mixtral-4l"
    method = a.method or ("rtn" if big else "hqq")
    # which stores the chosen configurations need (labels only: no store is made for this call)
    wanted = [c for c in configurations(src, src, src, {}, big, "") if not a.only or c["label"] in a.only]
    q4 = store(src, a.workdir, method)
    pre = store(src, a.workdir, method, prepack=True) if any("prepacked" in c["label"] for c in wanted) else q4
    gg = {} if a.quick else ggufs(src, a.workdir)
    rows = []
    for cfg in configurations(src, q4, pre, gg, big, "bfloat16" if big else "float32"):
        if a.only and cfg["label"] not in a.only:
            continue
        if "gguf" in cfg:
            cfg = cfg | {"repack": not a.llama_no_repack}
        for t in a.threads:
            r = run_child(cfg | {"threads": t, "tokens": a.tokens, "repeats": a.repeats})
            rows.append({**cfg, "threads": t, **r})
            print(f"{cfg['label']:>32} {t} thr: " + (f"{r['tok_s']:.2f} tok/s" if "tok_s" in r else r["error"]),
                  file=sys.stderr)
    import torch

    result = {"model": a.model, "checkpoint": str(src), "store": str(q4), "threads": a.threads,
              "tokens": a.tokens, "repeats": a.repeats, "prompt_tokens": PROMPT_LEN,
              "machine": f"{cpu_model()}, {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
              "cpu_capability": capability(), "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
              "llama_cpp": llama_cpp_build(), "rows": rows}
    from mixtral_lite.runtime.runstats import write_json_atomic

    name = "quick" if a.quick else a.model.replace("/", "-") if a.model in (*PRESETS, "shipped") else src.name
    if os.environ.get("ATEN_CPU_CAPABILITY"):  # a lower capability than the machine's: its own file
        name += f"-{capability()}"
    write_json_atomic(RESULTS / f"bench_fused-{name}.json", result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
