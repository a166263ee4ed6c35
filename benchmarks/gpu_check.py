"""One command for a machine with a GPU: what only a real card can tell (issue 12).

    python benchmarks/gpu_check.py [--workdir DIR] [--tokens 32] [--skip-tests]

bf16 throughout; the shipped model, and a mixtral-1/8 checkpoint made once into --workdir
(tools/make_synthetic_checkpoint.py, 1.5 GB). Sized to finish in under 10 minutes on a 12 GB card:
  1. tests      the CUDA-marked tests under TORCH_CUDA_SANITIZER=1 (races between streams raise)
  2. shipped    the shipped model at K=8 (resident), K=4 ram, K=4 mmap: identical greedy ids, hit rate,
                prefetch recall, stall
  3. syncs      host syncs per decoded token, counted by torch.cuda.set_sync_debug_mode("warn")
  4. sweep      mixtral-1/8: bytes/token and stall at K=2/4/8, prefetch on and off; and a --device-memory
                budget against memory_reserved() + the context (what nvidia-smi shows)
  5. experts    ms per expert use (one decoding token) for bf16, 4-bit and 2-bit experts, fused and dequant
  6. hybrid     the shipped model at K=2 with every miss copied, run on the CPU, and auto (issue 14): the
                calibrated cost model, how the misses were served, greedy ids against copy, tok/s
Writes benchmarks/results/gpu_check.json and prints a table. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = [1, 661, 349, 264, 5307, 25235, 22010, 28725, 369, 264, 2692, 676, 297, 15567, 302, 264, 1179, 28705]
GIB = 1 << 30
DEVICE = "cuda"  # tests run the device-agnostic parts with "cpu"


def sanitizer_tests() -> dict:
    env = {**os.environ, "TORCH_CUDA_SANITIZER": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    return {"ok": out.returncode == 0, "summary": last, "seconds": round(time.perf_counter() - t0, 1),
            "tail": out.stdout[-2000:] if out.returncode else ""}


def greedy(model, n: int) -> tuple[list[int], float]:
    """n greedy ids after PROMPT, and decode seconds (every token after the first)."""
    from mixtral_lite.generation.decode import generate_stream

    ids, t_first = [], None
    for step in generate_stream(model, [PROMPT], n, window=256, temperature=0.0):
        ids.append(int(step[0]))
        if t_first is None:
            _sync()
            t_first = time.perf_counter()
    _sync()
    return ids, time.perf_counter() - t_first


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def load(path, factory=None):
    import torch

    from mixtral_lite.runtime.load import load_model

    return load_model(path, device=DEVICE, dtype=torch.bfloat16, experts=factory)


def engine_row(model, ids, seconds: float, n: int) -> dict:
    s = model.experts.stats() if hasattr(model.experts, "engine") else {}
    return {"hit_rate": s.get("hit_rate"), "recall": s.get("prefetch_recall"), "stall_s": s.get("stall_s"),
            "bytes_per_token": s.get("bytes_per_token"), "decode_tok_s": (n - 1) / seconds if seconds else None}


def shipped(n: int) -> dict:
    from mixtral_lite import default_model_path
    from mixtral_lite.runtime.offloading import make_factory

    rows, want = {}, None
    for name, factory in (("K=8 resident", None), ("K=4 ram", make_factory(slots=4, store="ram")),
                          ("K=4 mmap", make_factory(slots=4, store="mmap"))):
        model = load(default_model_path(), factory)
        greedy(model, 4)  # warm-up: kernels, allocator, int4 conversions
        ids, seconds = greedy(model, n)
        want = want or ids
        rows[name] = {"same_ids": ids == want, **engine_row(model, ids, seconds, n)}
        _close(model)
    return rows


def hybrid(n: int) -> dict:
    from mixtral_lite import default_model_path
    from mixtral_lite.runtime.offloading import make_factory

    rows, want = {}, None
    for mode in ("copy", "cpu", "auto"):
        model = load(default_model_path(), make_factory(slots=2, store="ram", miss_policy=mode))
        greedy(model, 4)
        ids, seconds = greedy(model, n)
        want = want or ids
        s, misses = model.experts.stats(), model.experts.engine.miss_policy
        rows[f"K=2 {mode}"] = {"same_ids_as_copy": ids == want, "copies": s["expert_copies"],
                               "cpu_runs": s["cpu_expert_runs"], "cpu_s": s["cpu_expert_s"],
                               "cost_model": misses.costs.describe() if misses.costs else misses.mode,
                               **engine_row(model, ids, seconds, n)}
        _close(model)
    return rows


def _close(model) -> None:
    import torch

    if hasattr(model.experts, "engine"):
        model.experts.engine.close()
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def syncs(n: int) -> dict:
    """Host syncs per decoded token (runs of 1 and n + 1 tokens), as the CUDA sync debug mode reports them."""
    import torch

    from mixtral_lite import default_model_path
    from mixtral_lite.model.config import ModelConfig
    from mixtral_lite.runtime.offloading import make_factory

    model = load(default_model_path(), make_factory(slots=4, store="ram"))
    greedy(model, 4)

    def count(tokens: int) -> int:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                greedy(model, tokens)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in seen)

    per_token = (count(n + 1) - count(1)) / n
    layers = ModelConfig.from_dir(default_model_path()).num_layers
    _close(model)
    return {"per_token": per_token, "budget": layers + 1, "ok": per_token <= layers + 1}


def mixtral_1_8(workdir: Path) -> Path:
    path = workdir / "mixtral-1-8-bfloat16"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_checkpoint.py"), str(path),
                        "--preset", "mixtral-1/8", "--dtype", "bfloat16"], check=True)
    return path


def sweep(path: Path, n: int) -> dict:
    from mixtral_lite.runtime.offloading import make_factory

    rows = {}
    for k in (2, 4, 8):
        for prefetch in (True, False):
            model = load(path, make_factory(slots=k, store="ram", prefetch=prefetch))
            greedy(model, 4)
            ids, seconds = greedy(model, n)
            rows[f"K={k} prefetch {'on' if prefetch else 'off'}"] = engine_row(model, ids, seconds, n)
            _close(model)
    return rows


def budget(path: Path, gib: float, n: int) -> dict:
    """A --device-memory run: what the plan said against what the device holds (torch + context)."""
    import torch

    from mixtral_lite.model.config import ModelConfig
    from mixtral_lite.runtime.offloading import build
    from mixtral_lite.runtime.plan import ExpertChoice, LoadPlan

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_free, total = torch.cuda.mem_get_info()
    base_reserved = torch.cuda.memory_reserved()
    cfg = ModelConfig.from_dir(path)
    plan = LoadPlan(path, cfg, torch.device("cuda"), torch.bfloat16, window=cfg.sliding_window or 256, chunk=512,
                    experts=ExpertChoice(device_memory=gib))  # -c 256 --device-memory GIB
    model = load(path, build(plan))
    greedy(model, n)
    free, _ = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    outside = (total - free) - reserved  # context, cuBLAS workspaces, anything torch does not allocate
    cache = model.experts.engine.cache
    out = {"device_memory_gib": gib, "k": cache.quota, "pool_slots": cache.num_slots,
           "max_allocated_gib": torch.cuda.max_memory_allocated() / GIB, "reserved_gib": reserved / GIB,
           "outside_torch_gib": outside / GIB, "used_gib": (total - free) / GIB,
           "before_gib": (total - base_free - base_reserved) / GIB, "within": (total - free) <= gib * GIB}
    _close(model)
    return out


SHAPES = {"1/8": (1792, 512), "8x7B": (14336, 4096)}  # (intermediate, hidden) of Mixtral-1/8 and 8x7B


def expert_ms(repeats: int = 50, shapes: dict = SHAPES) -> dict:
    """ms per expert use, one decoding token, per expert shape (intermediate, hidden)."""
    import torch

    from mixtral_lite.model.experts import expert_function, swiglu_expert
    from offload.fused import FusedCodec, fused_unsupported
    from offload.packing import pack_into, views
    from offload.quant import HQQCodec, QuantSpec, quantize_expert

    out = {}
    dev = DEVICE
    for label, (i, d) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(0)
        mats = {"w1": torch.randn(i, d, device=dev, generator=g) / d**0.5,
                "w2": torch.randn(d, i, device=dev, generator=g) / i**0.5,
                "w3": torch.randn(i, d, device=dev, generator=g) / d**0.5}
        x = torch.randn(1, d, device=dev, dtype=torch.bfloat16)
        bf = {k: v.bfloat16() for k, v in mats.items()}
        out[f"{label} bf16"] = _time(lambda x=x, w=bf: swiglu_expert(x, w["w1"], w["w2"], w["w3"]), repeats)
        mshapes = {k: tuple(v.shape) for k, v in mats.items()}
        for bits in (4, 2):
            spec = QuantSpec(bits=bits, group_size=64)
            codecs = {"dequant": HQQCodec(mshapes, spec, dev, torch.bfloat16)}
            if fused_unsupported(mshapes, spec, dev) is None:
                codecs["fused"] = FusedCodec(mshapes, spec, dev, stack={"w13": ("w1", "w3")})
            parts = quantize_expert(mats, spec, dev, method="rtn")
            packed = torch.zeros(codecs["dequant"].layout.nbytes, dtype=torch.uint8, device=dev)
            pack_into(packed, codecs["dequant"].layout, {k: v.to(dev) for k, v in parts.items()})
            for kind, codec in codecs.items():
                src = views(packed, codec.layout)
                if kind == "fused":
                    slot = torch.zeros(codec.slot_layout.nbytes, dtype=torch.uint8, device=dev)
                    codec.convert(src, views(slot, codec.slot_layout))
                    src = views(slot, codec.slot_layout)
                fn = expert_function(codec)
                out[f"{label} {bits}-bit {kind}"] = _time(lambda fn=fn, c=codec, s=src, x=x: fn(x, *c.decode(s)),
                                                          repeats)
        if dev == "cuda":  # the 8x7B matrices go before the next shape
            torch.cuda.empty_cache()
    return out


def _time(fn, repeats: int) -> float:
    """Median ms of fn() over `repeats` timed calls after 5 warm-ups, by CUDA events (the clock on the CPU)."""
    import torch

    for _ in range(5):
        fn()
    if DEVICE != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def section(results: dict, name: str, fn, *args) -> None:
    """Run one part; a failure is recorded, and the other parts still run."""
    t0 = time.perf_counter()
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    try:
        results[name] = fn(*args)
    except Exception as e:  # noqa: BLE001  (a report, not a crash: every section gets its chance)
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)


def table(results: dict) -> str:
    lines = [f"# gpu_check on {results['device']} (torch {results['torch']})", ""]
    for name in ("tests", "syncs", "budget"):
        lines.append(f"- {name}: {json.dumps(results.get(name))}")
    for name in ("shipped", "sweep", "hybrid"):
        rows = results.get(name) or {}
        if "error" in rows:
            lines.append(f"- {name}: {rows['error']}")
            continue
        lines += ["", f"| {name} | " + " | ".join(next(iter(rows.values()), {}).keys()) + " |",
                  "|---" * (1 + len(next(iter(rows.values()), {}))) + "|"]
        for label, row in rows.items():
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in row.values()) + " |")
    ms = results.get("experts") or {}
    lines += ["", "| expert use (1 token) | ms |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in ms.items()]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "work")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--device-memory", type=float, default=2.0, help="GiB for the budget run on mixtral-1/8")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a machine with a GPU)")
        return 0
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "total_gib": torch.cuda.mem_get_info()[1] / GIB}
    if not args.skip_tests:
        section(results, "tests", sanitizer_tests)
    section(results, "shipped", shipped, args.tokens)
    section(results, "syncs", syncs, 16)
    path = mixtral_1_8(args.workdir)
    section(results, "sweep", sweep, path, args.tokens)
    section(results, "budget", budget, path, args.device_memory, args.tokens)
    section(results, "experts", expert_ms)
    section(results, "hybrid", hybrid, args.tokens)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
