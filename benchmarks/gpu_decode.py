"""The decoding step on a GPU (issues 21 and 22): tokens/s, host syncs, launches and device time per token.

    python benchmarks/gpu_decode.py [--store DIR] [--trace FILE] [--tokens 48] [--sections kernels,shipped,full]

  kernels  the table kernels (offload/triton_moe.py) at Mixtral-8x7B's expert shape: ms for one layer's two
           experts read from device memory and read in place from pinned host memory (GB/s over the bus),
           against torch's int4 kernel on the same experts
  shipped  the shipped model's 4-bit store: every expert resident and K=4, CUDA graphs on and off (greedy ids
           compared), per-token profile
  full     a Mixtral-8x7B-shaped 4-bit store (tools/make_synthetic_store.py --preset mixtral-8x7b
           --reuse-experts --prepack into --store when missing): every expert resident, --device-memory 11
           (a 12 GB card) with random routing and with real Mixtral routing replayed from --trace
           (../shared/data/routing/), and the copying engine of before for comparison

Every configuration runs in its own process (a crash or a hang costs that row only) and writes one JSON row;
the rows go to benchmarks/results/gpu_check.json under "decode", with the machine named. Profile rows:
wall ms per token, device-busy ms per token (kernel time in torch.profiler), kernels per token, host launch
calls per token (cudaLaunchKernel + cuLaunchKernel + cudaGraphLaunch), host syncs per token
(torch.cuda.set_sync_debug_mode). Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # routing_replay, in the child processes
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = [1, 661, 349, 264, 5307, 25235, 22010, 28725, 369, 264, 2692, 676, 297, 15567, 302, 264, 1179, 28705]
TRACE = ROOT.parent / "shared" / "data" / "routing" / "mixtral-8x7b-instruct" / "humaneval-decode.jsonl"
GIB = 1 << 30


SETTLE = 3  # tokens before the clock starts: the prompt, the eager step that warms up, the step that captures


def greedy(model, n: int, window: int = 4096) -> tuple[list[int], float]:
    """n greedy ids after PROMPT and the seconds of the n - SETTLE decoding steps after the graph exists."""
    import torch

    from mixtral_lite.generation.decode import generate_stream

    ids, t0 = [], time.perf_counter()
    for step in generate_stream(model, [PROMPT], n, window=window):
        ids.append(int(step[0]))
        if len(ids) == SETTLE:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
    torch.cuda.synchronize()
    return ids, time.perf_counter() - t0


def profile(model, n: int = 9) -> dict:
    """Per decoded token: wall ms, device-busy ms, kernels, host launch calls, host syncs."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def syncs(tokens: int) -> int:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                greedy(model, tokens)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in seen)

    out = {"syncs_per_token": (syncs(n + SETTLE) - syncs(SETTLE)) / n}
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, seconds = greedy(model, n + SETTLE)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [e for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                        "cuLaunchKernelEx", "cudaGraphLaunch")]
    # the prefill, warm-up and capture of greedy() are in the profile too: subtract a SETTLE-token run's counts
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as base:
        greedy(model, SETTLE)
    k0 = [e for e in base.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    l0 = [e for e in base.events() if e.name in {e.name for e in launches}]
    busy = sum(e.time_range.elapsed_us() for e in kernels) - sum(e.time_range.elapsed_us() for e in k0)
    out.update(ms_per_token_profiled=1000 * seconds / n, device_busy_ms_per_token=busy / 1000 / n,
               kernels_per_token=(len(kernels) - len(k0)) / n, launch_calls_per_token=(len(launches) - len(l0)) / n,
               top_device=prof.key_averages().table(sort_by="self_device_time_total", row_limit=12,
                                                    max_name_column_width=50))
    return out


def child(job: dict) -> dict:
    """One configuration in this process."""
    import torch

    from mixtral_lite.model.config import ModelConfig
    from mixtral_lite.runtime import offloading
    from mixtral_lite.runtime.load import load_model
    from mixtral_lite.runtime.plan import ExpertChoice, LoadPlan

    path = Path(job["store"])
    cfg = ModelConfig.from_dir(path)
    t0 = time.perf_counter()
    if job.get("device_memory"):
        plan = LoadPlan(path, cfg, torch.device("cuda"), torch.bfloat16, window=4096, chunk=512,
                        experts=ExpertChoice(device_memory=job["device_memory"], miss_policy=job.get("miss")))
        factory = offloading.build(plan)
    else:
        factory = offloading.make_factory(slots=job.get("slots"), miss_policy=job.get("miss"))
    model = load_model(path, device="cuda", dtype=torch.bfloat16, experts=factory)
    model.cuda_graphs = job.get("graphs", True)
    out = {"load_s": time.perf_counter() - t0, "experts": type(model.experts).__name__,
           "kernels": dict(getattr(model, "kernel_notes", {})), "max_reserved_gib": None}
    if job.get("trace"):  # real Mixtral routing (benchmarks/routing_replay.py: gaps, weights, rows)
        from routing_replay import RoutingReplay

        out["trace"] = RoutingReplay.from_trace(job["trace"]).install(model).summary()
    greedy(model, 4)  # warm-up: kernels compiled, graphs captured, caches filled
    n = job.get("tokens", 48)
    ids, seconds = greedy(model, n)
    s = model.experts.stats() if model.experts is not None else {}
    out.update(ids=ids, decode_tok_s=(n - SETTLE) / seconds, wall_ms_per_token=1000 * seconds / (n - SETTLE),
               stats={k: v for k, v in s.items() if not isinstance(v, (dict, list))},
               max_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    if job.get("profile"):
        out["profile"] = profile(model)
    return out


def run_child(job: dict, timeout: int, log: Path) -> dict:
    """One configuration in a child process; its stderr is appended to `log` as it runs (kept when it hangs)."""
    t0 = time.perf_counter()
    start = log.stat().st_size if log.is_file() else 0
    with open(log, "a") as err:
        err.write(f"\n== {json.dumps(job)}\n")
        err.flush()
        try:
            r = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE,
                               stderr=err, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s", "stderr": log.read_text()[start:][-3000:]}
    text = log.read_text()[start:]
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}", "stderr": text[-3000:]}
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["stderr"] = [line for line in text.splitlines() if not line.startswith("quantize")][-8:]
    row["wall_s"] = time.perf_counter() - t0
    return row


def kernels_section() -> dict:
    """ms for one layer's two experts at Mixtral-8x7B's shape: table kernels from device / from pinned host
    memory, and torch's int4 kernel (tinygemm) on the same codes."""
    import torch

    from offload import triton_moe
    from offload.fused import kernel_layout, output_matrices
    from offload.kernels import Int4Mat, pack_int4_codes, pack_int4_meta
    from offload.packing import views

    out = {"self_check": triton_moe.self_check(torch.device("cuda"))}
    d, i, g = 4096, 14336, 64
    _, names, shapes = output_matrices({"w1": (i, d), "w2": (d, i), "w3": (i, d)}, {"w13": ("w1", "w3")})
    rows = kernel_layout(names, shapes, g, "cuda", rows=True)
    dev = torch.randint(0, 256, (2, rows.nbytes), dtype=torch.uint8, device="cuda")
    for e in range(2):  # sane scales and zeros: (s, z) = (0.01, 0) in every group
        for name in names:
            views(dev[e], rows)[f"{name}.sz"].copy_(torch.tensor([0.01, 0.0], dtype=torch.bfloat16))
    host = dev.cpu().pin_memory()
    off = {en.name: en.offset for en in rows.entries}
    moe = triton_moe.TableMoE(d, i, g, off, 2)
    x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    ids, w = torch.tensor([[0, 1]], device="cuda"), torch.tensor([[0.6, 0.4]], device="cuda")
    h, y = torch.empty(2, i, dtype=torch.bfloat16, device="cuda"), torch.empty(1, d, dtype=torch.bfloat16,
                                                                               device="cuda")
    for label, buf in (("device", dev), ("pinned host, read in place", host)):
        table = torch.tensor([buf[0].data_ptr(), buf[1].data_ptr()], dtype=torch.int64, device="cuda")
        ms = _time(lambda t=table: moe(x, ids, w, t, 0, h, y))
        out[f"table kernels, experts in {label}: ms"] = ms
        out[f"table kernels, experts in {label}: GB/s"] = 2 * rows.nbytes / ms / 1e6
    tiny = kernel_layout(names, shapes, g, "cuda")
    mats = []
    for _ in range(2):
        buf = torch.empty(tiny.nbytes, dtype=torch.uint8, device="cuda")
        v = views(buf, tiny)
        for name in names:
            n, k = shapes[name]
            pack_int4_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda"), v[f"{name}.w"])
            pack_int4_meta(torch.full((n, k // g), 0.01, device="cuda"), torch.full((n, k // g), 8.0, device="cuda"),
                           v[f"{name}.sz"])
        mats.append([Int4Mat(v[f"{n}.w"], v[f"{n}.sz"], g, shapes[n][0]) for n in names])

    def torch_int4():
        for w13, w2 in mats:
            gate, up = w13(x).chunk(2, dim=-1)
            w2(torch.nn.functional.silu(gate) * up)
    ms = _time(torch_int4)
    out["torch int4 kernel (tinygemm), 2 experts: ms"] = ms
    out["torch int4 kernel (tinygemm), 2 experts: GB/s"] = 2 * tiny.nbytes / ms / 1e6
    return out


def _time(fn, repeats: int = 20) -> float:
    import statistics

    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def shipped_store(workdir: Path) -> Path:
    from mixtral_lite import default_model_path

    dst = workdir / "shipped-q4"
    if not (dst / "manifest.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "tools" / "quantize_experts.py"), str(default_model_path()),
                        str(dst), "--bits", "4", "--method", "rtn"], check=True, capture_output=True, cwd=ROOT)
    return dst


def full_store(path: Path) -> Path:
    if not (path / "manifest.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_store.py"), str(path), "--preset",
                        "mixtral-8x7b", "--reuse-experts", "--prepack", "-t", str(os.cpu_count() or 8)],
                       check=True, capture_output=True, cwd=ROOT, timeout=600)
        print(f"gpu_decode: full-size store made in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


CONFIGS = {
    "shipped": [("resident, graphs", dict(slots=8, profile=True)), ("resident, eager", dict(slots=8, graphs=False,
                                                                                             profile=True)),
                ("K=4 read, graphs", dict(slots=4, profile=True)), ("K=4 copy (before)", dict(slots=4, miss="copy"))],
    # a profile runs in a row of its own: if torch.profiler hangs or crawls, the plain row's figures are kept
    "full": [("resident, graphs", dict(slots=8)),
             ("11 GiB read, graphs, real routing", dict(device_memory=11, trace=True)),
             ("resident, graphs, profile", dict(slots=8, profile=True, tokens=8)),
             ("11 GiB read, graphs, random routing", dict(device_memory=11, profile=True)),
             ("11 GiB copy (before), real routing", dict(device_memory=11, miss="copy", trace=True, tokens=16)),
             ("resident, eager", dict(slots=8, graphs=False, tokens=24))],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=Path("/dev/shm/mixtral-8x7b-q4"), help="full-size store")
    ap.add_argument("--trace", type=Path, default=TRACE, help="real Mixtral routing (JSONL) to replay")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpu-decode"))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--sections", default="kernels,shipped,full")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_decode: no CUDA device here; nothing to measure")
        return 0
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpus": os.cpu_count()}
    a.workdir.mkdir(parents=True, exist_ok=True)
    for section in a.sections.split(","):
        t0 = time.perf_counter()
        try:
            if section == "kernels":
                res[section] = kernels_section()
            else:
                store = shipped_store(a.workdir) if section == "shipped" else full_store(a.store)
                res[section] = {}
                for label, cfg in CONFIGS[section]:
                    job = {"store": str(store), "tokens": a.tokens, **cfg}
                    if cfg.get("trace"):
                        job["trace"] = str(a.trace)
                    log = Path(os.environ.get("OUT", a.workdir)) / "children.log"
                    res[section][label] = run_child(job, a.timeout, log)
                    print(f"gpu_decode: {section} / {label}: {_brief(res[section][label])}", file=sys.stderr,
                          flush=True)
                    _save(res)
        except Exception as e:  # noqa: BLE001  (a report, not a crash: every section gets its chance)
            res[section] = {"error": f"{type(e).__name__}: {e}"}
        print(f"gpu_decode: {section} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        _save(res)
    return 0


def _brief(row: dict) -> str:
    if "error" in row:
        return row["error"] + " " + row.get("stderr", "")[-500:]
    p = row.get("profile", {})
    return (f"{row['decode_tok_s']:.1f} tok/s, load {row['load_s']:.0f} s, hit rate {row['stats'].get('hit_rate')}, "
            f"bytes/token {row['stats'].get('bytes_per_token')}, syncs/token {p.get('syncs_per_token')}, "
            f"kernels/token {p.get('kernels_per_token')}, launches/token {p.get('launch_calls_per_token')}, "
            f"busy ms/token {p.get('device_busy_ms_per_token')}")


def _save(res: dict) -> None:
    """Into benchmarks/results/gpu_check.json under "decode" (and $OUT when set), atomically."""
    path = RESULTS / "gpu_check.json"
    whole = json.loads(path.read_text()) if path.is_file() else {}
    whole["decode"] = res
    for target in [path] + ([Path(os.environ["OUT"]) / "gpu_decode.json"] if os.environ.get("OUT") else []):
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(whole if target == path else res, indent=1) + "\n")
        os.replace(tmp, target)


if __name__ == "__main__":
    sys.exit(main())
