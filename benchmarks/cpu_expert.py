"""ms per full-size Mixtral expert on the host, against the host's DRAM read bandwidth and llama.cpp's Q4_0 expert.

    python benchmarks/cpu_expert.py [--threads 1 2] [--repeats 20] [--llama-tokens 12] [--workdir DIR] [--contention]
                                    [--quick]

  ours       one Mixtral-8x7B expert (w1, w3 4096->14336 stacked as w13; w2 14336->4096), 4-bit codes in groups
             of 64 with a bf16 scale and zero per group (4.5 bits a weight: the slot layout a --prepack store
             holds and an hqq store is converted into), one token, bf16 activations, through the path a miss
             run on the host takes: offload/host_experts.py (HostExperts.run, reading the expert in place) and
             torch's CPU int4 kernel (offload/fused.py's codec). The experts timed rotate over a set more than
             twice the L3 cache's size, so each run reads its weights from DRAM as a miss does; "one expert
             re-read" is the same expert every run (what offload/host_experts.calibrate timed: cache-resident
             wherever the L3 holds an expert, 99 MB).
  DRAM       a streaming read (torch's sum) of a buffer 4x the L3 (>= 1 GiB), at the same threads: GB/s, and the
             share of it the expert reaches (its bytes / its time; the goal is >= 80%).
  llama.cpp  a one-layer Mixtral-8x7B-shaped Q4_0 GGUF (benchmarks/gguf_synthetic.py; Q4_0 is 4.5 bits a weight
             too, the same bytes per expert), decoded by llama.cpp as bench_fused.py runs it
             (bench_llamacpp.llama_engine), with 2 and with 8 experts per token (llama.cpp's --override-kv
             llama.expert_used_count): the difference of the time per token over 6 is one expert, everything
             else in the step (attention, output head, sampling) cancelling. Skipped when llama_cpp is not
             importable (PYTHONPATH=/work/lcpp/native).

--contention adds the measurements behind "beside a copy" without a GPU (see `contention`). Medians of
--repeats runs. --quick: a 512 -> 1792 expert (it fits in the caches: its % of DRAM says nothing),
a 256 MiB stream, 1 thread, no llama.cpp. Writes benchmarks/results/cpu_expert[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from mixtral_lite.model.experts import expert_function  # noqa: E402
from mixtral_lite.model.qstore import STACK  # noqa: E402
from mixtral_lite.runtime.runstats import write_json_atomic  # noqa: E402
from offload.fused import FusedCodec  # noqa: E402
from offload.host_experts import HostExperts, largest_cache_bytes  # noqa: E402
from offload.kernels import pack_int4_codes, pack_int4_meta  # noqa: E402
from offload.packing import views  # noqa: E402
from offload.quant import QuantSpec  # noqa: E402
from offload.store import Piece  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FULL, QUICK = (4096, 14336), (512, 1792)  # (hidden D, intermediate I)
SPEC = QuantSpec(4, 64, 1, 8)  # groups of 64 along the input: what the int4 kernel reads
EXPERTS_USED = (2, 8)  # llama.cpp runs: Mixtral's top-2, and every expert (the difference is 6 experts)
PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28770]


class KernelLayoutExperts:
    """Experts already in the CPU kernel's slot layout, one buffer each (what a --prepack store's RAM holds)."""

    def __init__(self, layout, buffers: list[torch.Tensor]):
        self.layout, self.buffers = layout, buffers
        self.num_layers, self.num_experts, self.pinned = 1, len(buffers), False

    def pieces(self, layer: int, expert: int) -> list[Piece]:
        return [Piece(self.buffers[expert], 0)]

    def release(self, layer: int, expert: int) -> None:
        pass


def host_experts(d: int, i: int, count: int) -> HostExperts:
    """`count` copies of one random expert (codes uniform, scale 0.01, zero 8) behind HostExperts."""
    codec = FusedCodec({"w1": (i, d), "w2": (d, i), "w3": (i, d)}, SPEC, "cpu", STACK)
    layout = codec.slot_layout
    one = torch.empty(layout.nbytes, dtype=torch.uint8)
    v = views(one, layout)
    gen = torch.Generator().manual_seed(0)
    for name in codec.names:
        n, k = codec.out_shapes[name]
        pack_int4_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen), v[f"{name}.w"])
        g = SPEC.group_size
        pack_int4_meta(torch.full((n, k // g), 0.01), torch.full((n, k // g), 8.0), v[f"{name}.sz"])
    host = HostExperts(KernelLayoutExperts(layout, [one] + [one.clone() for _ in range(count - 1)]), codec,
                       expert_function(codec))
    if not host.in_place:
        raise SystemExit("cpu_expert: the experts are not read in place (the kernel's layout differs from theirs)")
    return host


def time_expert(host: HostExperts, d: int, repeats: int, rotate: bool) -> float:
    """Median seconds of one host expert (one token): rotating over every expert, or expert 0 again and again."""
    x = torch.randn(1, d)
    n = host.store.num_experts if rotate else 1
    for e in range(n):  # warm-up: kernels, page faults
        host.run(0, e, x)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        host.run(0, r % n, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dram_read(nbytes: int, repeats: int = 5) -> float:
    """GB/s of a streaming read (sum) of an nbytes float32 buffer, median of `repeats`."""
    buf = torch.ones(nbytes // 4)
    buf.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def one_layer_gguf(workdir: Path) -> Path:
    """A one-layer Mixtral-8x7B-shaped Q4_0 GGUF (about 1 GB), made once."""
    from gguf_synthetic import write
    from make_synthetic_checkpoint import PRESETS

    out = workdir / "mixtral-8x7b-1layer-q4_0.gguf"
    if not out.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        write(out, {**PRESETS["mixtral-8x7b"], "layers": 1})
    return out


def llama_child(job: dict) -> dict:
    """Seconds per decoded token with 2 and with 8 experts per token, at job['threads'] (its own process)."""
    from bench_llamacpp import llama_engine

    out = {}
    for used in EXPERTS_USED:
        run = llama_engine(Path(job["gguf"]), PROMPT, job["tokens"], 256, "f16", job["threads"],
                           overrides={"llama.expert_used_count": used})
        run()  # warm-up
        out[used] = statistics.median(1 / run()[0] for _ in range(job["repeats"]))
    return {"s_per_token": out, "expert_s": (out[8] - out[2]) / (EXPERTS_USED[1] - EXPERTS_USED[0])}


def llama_expert(gguf: Path, threads: int, tokens: int, repeats: int) -> dict:
    job = {"gguf": str(gguf), "threads": threads, "tokens": tokens, "repeats": repeats}
    r = subprocess.run([sys.executable, __file__, "--llama-child", json.dumps(job)], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def measure(threads: int, host: HostExperts, d: int, expert_bytes: int, stream_bytes: int, repeats: int,
            gguf: Path | None, llama_tokens: int) -> dict:
    torch.set_num_threads(threads)
    dram = dram_read(stream_bytes)
    rotated, again = time_expert(host, d, repeats, True), time_expert(host, d, repeats, False)
    gb_s = expert_bytes / rotated / 1e9
    row = {"threads": threads, "dram_read_gb_s": dram, "ours_ms": rotated * 1e3, "ours_gb_s": gb_s,
           "ours_pct_of_dram": 100 * gb_s / dram, "ours_one_expert_reread_ms": again * 1e3,
           "ms_at_dram_bandwidth": expert_bytes / dram / 1e6}
    if gguf is not None:
        lc = llama_expert(gguf, threads, llama_tokens, max(3, repeats // 5))
        row["llama_cpp"] = lc
        if "expert_s" in lc:
            row.update(llama_q4_0_ms=lc["expert_s"] * 1e3, ours_speed_vs_llama=lc["expert_s"] / rotated,
                       llama_pct_of_dram=100 * expert_bytes / lc["expert_s"] / 1e9 / dram)
    return row


def contention(host: HostExperts, d: int, repeats: int, threads: int) -> dict:
    """Why a host expert can run slower in a run than alone, measured without a GPU (ms, rotated experts):
    beside a process streaming a DRAM read on another core (a stand-in for a copy's DMA reading the same
    DRAM), and on a worker thread (as offload/engine.py runs host experts) while the main thread is idle,
    runs pure Python (the engine's bookkeeping) or launches small torch ops (queueing the device's work;
    each releases the GIL). The worker needs the GIL between the expert's ops: while the main thread runs
    Python it gets it only at the interpreter's switch interval (sys.getswitchinterval(), 5 ms)."""
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    out = {"alone_1_thread": time_expert(host, d, repeats, True) * 1e3}
    reader = subprocess.Popen([sys.executable, "-c", "import time, torch\ntorch.set_num_threads(1)\n"
                               "b = torch.ones(1 << 28)\nwhile True: b.sum()"])
    try:
        time.sleep(1.0)  # the reader is streaming
        out["beside_a_dram_reader_1_thread"] = time_expert(host, d, repeats, True) * 1e3
    finally:
        reader.kill()
        reader.wait()
    torch.set_num_threads(threads)
    pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))
    x, n = torch.randn(1, d), host.store.num_experts

    a, b = torch.ones(64), torch.empty(64)
    main_thread = {"idle": None, "python": lambda: sum(range(256)),
                   "torch_ops": lambda: [torch.add(a, a, out=b) for _ in range(16)]}

    def on_worker(busy) -> float:
        times = []
        for r in range(n + repeats):
            job = pool.submit(lambda r=r: (time.perf_counter(), host.run(0, r % n, x), time.perf_counter()))
            while busy is not None and not job.done():
                busy()
            t0, _, t1 = job.result()
            times.append(t1 - t0)
        return statistics.median(times[n:]) * 1e3
    for name, busy in main_thread.items():
        out[f"worker_{threads}_threads_main_{name}"] = on_worker(busy)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(interval / 10)  # a mitigation: the main thread yields the GIL ten times as often
    try:
        out[f"worker_{threads}_threads_main_python_switch_{interval * 100:g}_ms"] = on_worker(main_thread["python"])
    finally:
        sys.setswitchinterval(interval)
    pool.shutdown()
    return out


def markdown(rows: list[dict]) -> str:
    out = ["| threads | DRAM read GB/s | ours ms (from DRAM) | ours % of DRAM | ours ms (one expert re-read) "
           "| llama.cpp Q4_0 ms | llama.cpp % of DRAM | ours vs llama.cpp |", "|" + "---|" * 8]
    for r in rows:
        lc = (f"{r['llama_q4_0_ms']:.2f} | {r['llama_pct_of_dram']:.0f}% | {r['ours_speed_vs_llama']:.2f}x"
              if "llama_q4_0_ms" in r else "- | - | -")
        out.append(f"| {r['threads']} | {r['dram_read_gb_s']:.1f} | {r['ours_ms']:.2f} | {r['ours_pct_of_dram']:.0f}% "
                   f"| {r['ours_one_expert_reread_ms']:.2f} | {lc} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--llama-tokens", type=int, default=12, help="tokens per llama.cpp run")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mixtral-lite-bench")
    p.add_argument("--quick", action="store_true", help="a small expert, 1 thread, no llama.cpp")
    p.add_argument("--contention", action="store_true",
                   help="also time the expert beside a DRAM-reading process and on a worker thread (see contention)")
    p.add_argument("--llama-child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.llama_child:
        print(json.dumps(llama_child(json.loads(a.llama_child))))
        return 0
    d, i = QUICK if a.quick else FULL
    l3 = largest_cache_bytes()
    probe = FusedCodec({"w1": (i, d), "w2": (d, i), "w3": (i, d)}, SPEC, "cpu", STACK).slot_layout.nbytes
    count = 4 if a.quick else max(2, min(16, math.ceil(2 * (l3 or 256 << 20) / probe) + 1))
    stream = (256 << 20) if a.quick else max(1 << 30, 4 * (l3 or 0))
    threads, repeats = ([1], 3) if a.quick else (a.threads, a.repeats)
    host = host_experts(d, i, count)
    gguf = None
    if not a.quick and llama_available():
        gguf = one_layer_gguf(a.workdir)
    elif not a.quick:
        print("cpu_expert: llama.cpp rows skipped (llama_cpp not importable: PYTHONPATH=/work/lcpp/native)",
              file=sys.stderr)
    rows = [measure(t, host, d, probe, stream, repeats, gguf, a.llama_tokens) for t in threads]
    result = {"expert": {"hidden": d, "intermediate": i, "bits": SPEC.bits, "group": SPEC.group_size,
                         "bytes": probe, "experts_rotated": count, "activations": "bfloat16"},
              "l3_bytes": l3, "stream_bytes": stream, "repeats": repeats, "goal": "ours >= 80% of the DRAM read",
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                         f"torch {torch.__version__}",
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "quick": a.quick, "rows": rows}
    if a.contention:
        result["contention_ms"] = contention(host, d, repeats, max(threads))
        print(json.dumps(result["contention_ms"], indent=1))
    write_json_atomic(RESULTS / f"cpu_expert{'-quick' if a.quick else ''}.json", result)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
