"""End-to-end generation: mixtral-lite's configurations against transformers and a naive streamer.

    python benchmarks/bench_generate.py [-m CKPT ...] [-n 32] [--repeats 3] [--quick] [--json]

Each configuration runs in a fresh process (so peak RSS is its own): load, one warm-up
generation, then --repeats timed generations of -n tokens, greedy, each from a different
prompt (the same prompts for every configuration; a repeated prompt would replay the same
expert choices into a warm cache). Reported: medians over the timed runs of time to first
token, decode tokens/s, p50/p90 per-token latency; peak RSS; peak device bytes (measured on
CUDA, accounted on the CPU, see runstats.device_bytes); and, counted over the timed runs
only, hit rate, prefetch recall, host->device bytes per token and the stall share (time
spent waiting for copies / decode time).

Configurations (16-bit = the checkpoint's weights, computed in float32 on the CPU):
  resident             every expert on the device
  ram|mmap K=k pf=0|1  offloaded: k slots per layer, store in RAM or mmapped, prefetch off/on
  4-bit, 2-bit         experts quantized by tools/quantize_experts.py (hqq, default groups), K=4;
                       for every checkpoint run (see --quant-model)
  naive                no cache, no prefetch: every chosen expert is copied for every token
  transformers         MixtralForCausalLM.generate on the same weights, device and dtype
  llama.cpp            llama-cpp-python on a GGUF of the same weights (benchmarks/gguf_export.py, f32
                       weights and KV cache), only when llama_cpp is importable

Checkpoints (-m, repeatable): default the synthetic `mixtral-1/8` (full depth and expert
count, 1/8 width, random weights) and the shipped model when it exists. With random weights
the router's choices barely change from token to token, so their hit rates are far higher
than a trained model's: read hit rates from benchmarks/replay_routing.py on real routing.
--quick: the `tiny` synthetic preset, 8 tokens, 2 timed runs, a reduced configuration set.

Writes benchmarks/results/bench_generate[-quick].json, a PNG, and a markdown table (.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from generate_runners import PROMPT_LEN, child, source_stamp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _load_bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def quantized(src: Path, bits: int, workdir: Path) -> Path:
    """A quantized store of `src` (tools/quantize_experts.py, default group size), made once per version of src."""
    dst = workdir / f"{src.name}-{source_stamp(src)}-q{bits}"
    if (dst / "manifest.json").is_file():
        return dst
    if dst.exists():
        cmd_extra = ["--resume"]
    else:
        cmd_extra = []
    cmd = [sys.executable, str(ROOT / "tools" / "quantize_experts.py"), str(src), str(dst), "--bits", str(bits)]
    cmd += ["--device", "cpu", *cmd_extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise SystemExit(f"quantizing {src} to {bits} bits failed:\n{r.stderr[-2000:]}")
    print(f"quantized {src.name} to {bits} bits in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return dst


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def configurations(model: Path, q4: Path | None, q2: Path | None, quick: bool) -> list[dict]:
    """Every configuration of one checkpoint, as child jobs."""
    e = json.loads((model / "config.json").read_text()).get("num_local_experts", 0)
    ks = [k for k in ((2,) if quick else (2, 4, 6)) if k < e]
    mid = 4 if 4 < e else ks[-1] if ks else None
    jobs = [{"kind": "resident", "model": str(model), "label": "resident"}]
    for k in ks:
        for pf in (False, True):
            jobs.append({"kind": "offload", "model": str(model), "k": k, "store": "ram", "prefetch": pf})
    if mid:
        jobs.append({"kind": "offload", "model": str(model), "k": mid, "store": "mmap", "prefetch": True})
        jobs.append(
            {
                "kind": "offload",
                "model": str(model),
                "k": mid,
                "store": "ram",
                "prefetch": True,
                "policy": "markov",
                "label": f"ram K={mid} pf=on markov",
            }
        )
        for bits, q in ((4, q4), (2, q2)):
            if q is not None:
                jobs.append(
                    {"kind": "offload", "model": str(q), "k": mid, "store": "ram", "prefetch": True, "bits": bits}
                )
    jobs.append({"kind": "naive", "model": str(model), "store": "ram", "label": "naive streamer"})
    jobs.append({"kind": "transformers", "model": str(model), "label": "transformers"})
    jobs.append({"kind": "llama.cpp", "model": str(model), "label": "llama.cpp"})
    for j in jobs:
        j.setdefault("bits", 16)
        if "label" not in j:
            j["label"] = f"{j['store']} K={j['k']} pf={'on' if j['prefetch'] else 'off'}"
        if j["bits"] != 16:
            j["label"] = f"{j['bits']}-bit {j['label']}"
    return jobs


def run_child(job: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        return {**job, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def summarize(res: dict, reference: list[list[int]] | None) -> dict:
    """Medians over the timed runs and the counter-derived figures."""
    if "runs" not in res:
        why = f"skipped: {res['skipped']}" if "skipped" in res else f"FAILED: {res.get('error')}"
        return {"label": res["label"], "note": why}
    med = {k: statistics.median(r[k] for r in res["runs"]) for k in res["runs"][0]}
    row = {
        "label": res["label"],
        **med,
        "peak_rss_bytes": res["peak_rss_bytes"],
        "device_bytes": res["device_bytes"],
        "same_tokens_as_resident": res["ids"] == reference if reference is not None else None,
        "loadavg_1m": res.get("loadavg_1m"),
    }
    c = res.get("counters")
    if c:
        needed = c["hits"] + c.get("prefetch_used", 0) + c["misses"]  # uses a prefetch served are not hits
        row["hit_rate"] = c["hits"] / needed if needed else None
        row["prefetch_recall"] = c["recall_hits"] / c["recall_total"] if c.get("recall_total") else None
        row["bytes_per_token"] = c["bytes"] / c["tokens"] if c["tokens"] else None
        row["stall_share"] = c["stall_s"] / sum(r["total_s"] for r in res["runs"])
    return row


def _fmt(row: dict) -> list[str]:
    if "note" in row:
        return [row["label"], row["note"]] + [""] * 10

    def f(key, scale=1.0, spec=".2f"):
        v = row.get(key)
        return "" if v is None else format(v * scale, spec)

    same = {True: "yes", False: "no", None: ""}[row.get("same_tokens_as_resident")]
    return [
        row["label"],
        f("ttft_s", 1e3, ".0f"),
        f("decode_tokens_per_s"),
        f("p50_s", 1e3, ".1f"),
        f("p90_s", 1e3, ".1f"),
        f("peak_rss_bytes", 2**-20, ".0f"),
        f("device_bytes", 2**-20, ".0f"),
        f("hit_rate", 1, ".3f"),
        f("prefetch_recall", 1, ".3f"),
        f("bytes_per_token", 2**-20, ".2f"),
        f("stall_share", 100, ".1f"),
        same,
    ]


HEAD = [
    "configuration",
    "TTFT ms",
    "tok/s",
    "p50 ms",
    "p90 ms",
    "peak RSS MiB",
    "device MiB",
    "hit rate",
    "prefetch recall",
    "MiB/token",
    "stall %",
    "same tokens",
]


def markdown(results: dict, machine: str, settings: dict) -> str:
    lines = [f"Machine: {machine}. Settings: {json.dumps(settings)}.", ""]
    for model, rows in results.items():
        lines += [f"### {model}", "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        lines += ["| " + " | ".join(_fmt(r)) + " |" for r in rows] + [""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(12, 4 * len(results)), squeeze=False)
    for ax, (model, rows) in zip(axes[:, 0], results.items(), strict=True):
        rows = [r for r in rows if "decode_tokens_per_s" in r]
        ax.bar(range(len(rows)), [r["decode_tokens_per_s"] for r in rows])
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
        for i, r in enumerate(rows):
            if r.get("hit_rate") is not None:
                ax.annotate(f"hit {r['hit_rate']:.2f}", (i, r["decode_tokens_per_s"]), ha="center", fontsize=7)
        ax.set(ylabel="decode tokens/s (median)", title=model)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def checkpoints(a: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """(checkpoints to run, the ones that also get 4-bit and 2-bit configurations)."""
    from mixtral_lite import default_model_path

    shipped = default_model_path()
    has_shipped = not a.quick and (shipped / "config.json").is_file()
    if a.model:
        models = a.model
    else:
        synth = _load_bench_memory().synthetic("tiny" if a.quick else "mixtral-1/8", a.workdir)
        models = [synth] + ([shipped] if has_shipped else [])
    if a.quant_model is not None:
        return models, a.quant_model
    # hqq on this CPU: ~0.8 s per Mixtral-1/8 expert on a quiet machine (~3.5 min per bit width for
    # its 256 experts; 20 s per expert under load), done once per version of the checkpoint
    return models, models


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", type=Path, action="append", help="checkpoint (repeatable)")
    p.add_argument("-n", "--tokens", type=int, default=32, help="tokens generated per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    p.add_argument("--policy", default="lru", help="eviction policy of the offloaded configurations")
    p.add_argument(
        "--quant-model",
        type=Path,
        action="append",
        help="checkpoint that gets the 4-bit and 2-bit configurations (repeatable; default: every "
        "checkpoint run; each is quantized once per version of its files)",
    )
    p.add_argument("--window", type=int, default=4096, help="KV window when the model has no sliding window")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mixtral-lite-bench")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_generate[-quick].json)")
    p.add_argument("--quick", action="store_true", help="tiny model, 8 tokens, 2 timed runs, fewer configurations")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return {}
    if a.quick:
        a.tokens, a.repeats = min(a.tokens, 8), min(a.repeats, 2)
    settings = {
        "tokens": a.tokens,
        "repeats": a.repeats,
        "prompt_tokens": PROMPT_LEN,
        "threads": a.threads,
        "device": a.device,
        "dtype": "float32" if a.device == "cpu" else "bfloat16",  # generate_runners.default_dtype
        "policy": a.policy,
        "greedy": True,
    }
    results = {}
    models, quant = checkpoints(a)
    for model in models:
        q4 = q2 = None
        if model in quant:
            q4, q2 = quantized(model, 4, a.workdir), quantized(model, 2, a.workdir)
        jobs = configurations(model, q4, q2, a.quick)
        reference, rows = None, []
        for job in jobs:
            job.update(
                tokens=a.tokens,
                repeats=a.repeats,
                threads=a.threads,
                device=a.device,
                window=a.window,
                workdir=str(a.workdir),
            )
            job.setdefault("policy", a.policy)
            res = run_child(job)
            if job["kind"] == "resident" and "ids" in res:
                reference = res["ids"]
            rows.append(summarize(res, reference if job["bits"] == 16 else None))
            print(" | ".join(_fmt(rows[-1])), file=sys.stderr, flush=True)
        results[model.name] = rows
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch {_torch_version()}"
    md = markdown(results, machine, settings)
    print(md)
    out = {"benchmark": "generate", "machine": machine, "settings": settings, "quick": a.quick, "results": results}
    path = a.out or RESULTS / f"bench_generate{'-quick' if a.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(out, indent=1) + "\n"), (".md", md + "\n")):
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path.with_suffix(suffix))
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} (.md, .png)")
    if not a.quick and a.out is None:
        update_readme(md)
    if a.json:
        print(
            json.dumps(
                {
                    "benchmark": "generate",
                    "quick": a.quick,
                    "results": str(path),
                    "decode_tokens_per_s": {
                        m: {r["label"]: r.get("decode_tokens_per_s") for r in rows} for m, rows in results.items()
                    },
                }
            )
        )
    return out


README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- bench_generate:begin -->", "<!-- bench_generate:end -->"


def update_readme(md: str, readme: Path = README) -> None:
    """Replace the README's performance table (between the markers) with the latest results."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{readme}: no {BEGIN} ... {END} markers; performance table not updated", file=sys.stderr)
        return
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{BEGIN}\n{md}\n{END}{tail}")
    os.replace(tmp, readme)
    print(f"updated the performance table in {readme}", file=sys.stderr)


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
