"""4-bit stores on every CPU capability: perplexity and load-time conversion costs, side by side in one run.

    python benchmarks/cpu_capabilities.py [-m MODEL] [--text FILE] [--max-tokens N] [--quick]

torch's CPU int4 kernel reads a layout that depends on the CPU capability it dispatches to (offload/kernels.py);
ATEN_CPU_CAPABILITY selects a lower one on any x86 machine, so one machine measures them all:

1. The model's 4-bit rtn store, plain (hqq layout) and --prepack, each written under the lowest and the highest
   capability this machine selects, then read under every capability: perplexity on held-out text (the first
   --max-tokens tokens, windows of --ctx), against the unquantized fp32 model's.
2. Load-time costs at Mixtral-8x7B's size under each capability (one expert: w13 [28672, 4096] and w2
   [4096, 14336], 4-bit g64), best of 3, ms: our packing of the codes into the kernel's layout against torch's
   converter (`_convert_weight_to_int4pack_for_cpu`), and a --prepack expert written in another capability's
   layout converted into this one's (what a store made elsewhere costs per expert at load).

Writes benchmarks/results/cpu_capabilities.json (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEXT = ROOT.parent / "shared" / "data" / "corpus" / "austen-valid.txt"
ORDER = ("default", "avx2", "avx512")
MIXTRAL = {"w13": (28672, 4096), "w2": (4096, 14336)}


def capabilities() -> list[str]:
    """ATEN_CPU_CAPABILITY values this machine selects: its own and every lower one."""
    import torch

    native = torch.backends.cpu.get_cpu_capability().lower()
    return list(ORDER[: ORDER.index(native) + 1]) if native in ORDER else ["default"]


def _env(cap: str) -> dict:
    return {**os.environ, "ATEN_CPU_CAPABILITY": cap}


def _check(r: subprocess.CompletedProcess, what: str) -> str:
    if r.returncode != 0:
        raise SystemExit(f"{what} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def quantize(src: Path, dst: Path, cap: str, prepack: bool) -> None:
    cmd = [sys.executable, str(ROOT / "tools" / "quantize_experts.py"), str(src), str(dst), "--bits", "4",
           "--method", "rtn", "--device", "cpu", *(["--prepack"] if prepack else [])]
    _check(subprocess.run(cmd, env=_env(cap), capture_output=True, text=True), f"quantizing under {cap}")


def perplexity(model: Path, cap: str, a) -> dict:
    cmd = [sys.executable, "-m", "mixtral_lite.perplexity", "-m", str(model), "-f", str(a.text), "-c", str(a.ctx),
           "--max-tokens", str(a.max_tokens), "--json", "--no-progress", "--device", "cpu"]
    r = subprocess.run(cmd, env=_env(cap), capture_output=True, text=True, cwd=ROOT)
    out = json.loads(_check(r, f"perplexity of {model.name} under {cap}").splitlines()[-1])
    return {"ppl": out["perplexity"], "kernels": out.get("kernels", {})}


_COSTS = """
import json, sys, time, torch
from offload.kernels import CPU_LAYOUTS, native_cpu_layout, pack_int4_codes
torch.set_num_threads(int(sys.argv[1]))
shapes = json.loads(sys.argv[2])
def best(fn, n=3):
    t = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); t.append(time.perf_counter() - t0)
    return 1000 * min(t)
out = {"capability": torch.backends.cpu.get_cpu_capability(), "layout": native_cpu_layout().name}
ours = conv = other = 0.0
for n, k in shapes.values():
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    dst = torch.empty(n, k // 2, dtype=torch.uint8)
    ours += best(lambda: pack_int4_codes(codes, dst))
    c32 = codes.to(torch.int32)
    conv += best(lambda: torch.ops.aten._convert_weight_to_int4pack_for_cpu(c32, 2))
    foreign = next(l for l in CPU_LAYOUTS.values() if l != native_cpu_layout())
    stored = torch.empty(n * k // 2, dtype=torch.uint8)
    foreign.pack(codes, stored)
    scratch = torch.empty(n, k, dtype=torch.uint8)
    def convert():
        foreign.unpack(stored, scratch)
        pack_int4_codes(scratch, dst)
    other += best(convert)
out.update(ours_pack_ms=ours, torch_converter_ms=conv, foreign_prepack_ms=other, foreign_layout=foreign.name)
print(json.dumps(out))
"""


def costs(cap: str, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", _COSTS, str(threads), json.dumps(MIXTRAL)], env=_env(cap),
                       capture_output=True, text=True, cwd=ROOT)
    return json.loads(_check(r, f"conversion costs under {cap}").splitlines()[-1])


def table(res: dict) -> str:
    caps = res["capabilities"]
    lines = [f"fp32 model: perplexity {res['fp32_ppl']:.3f}", "",
             "| store | written under | " + " | ".join(f"read under {c}" for c in caps) + " |",
             "|---|---|" + "---|" * len(caps)]
    for row in res["stores"]:
        cells = [f"{row['read'][c]['ppl']:.3f} ({100 * (row['read'][c]['ppl'] / res['fp32_ppl'] - 1):+.2f}%)"
                 for c in caps]
        lines.append(f"| {row['store']} | {row['written']} | " + " | ".join(cells) + " |")
    lines += ["", "| capability | layout | our packing ms | torch's converter ms | a foreign --prepack expert ms |",
              "|---|---|---|---|---|"]
    for c in res["costs"]:
        lines.append(f"| {c['capability']} | {c['layout']} | {c['ours_pack_ms']:.0f} | {c['torch_converter_ms']:.0f}"
                     f" | {c['foreign_prepack_ms']:.0f} (from {c['foreign_layout']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", type=Path, help="checkpoint folder (default: the shipped model)")
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--max-tokens", type=int, default=5000, help="text tokens scored (~20 kB of Austen)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="200 tokens, the --prepack store written natively only, no conversion costs, not written")
    a = p.parse_args(argv)
    from mixtral_lite import default_model_path
    from mixtral_lite.runtime.runstats import write_json_atomic

    src = a.model or default_model_path()
    if a.quick:
        a.max_tokens = 200
    caps = capabilities()
    writers = [caps[-1]] if a.quick else sorted({caps[0], caps[-1]}, key=ORDER.index)
    if a.quick:
        caps = sorted({caps[0], caps[-1]}, key=ORDER.index)
    res = {"model": str(src), "text": str(a.text), "max_tokens": a.max_tokens, "ctx": a.ctx, "threads": a.threads,
           "capabilities": caps, "fp32_ppl": perplexity(src, caps[-1], a)["ppl"], "stores": [], "costs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for prepack in (True,) if a.quick else (False, True):
            for w in writers:
                dst = Path(tmp) / f"rtn{'-prepack' if prepack else ''}-{w}"
                t0 = time.perf_counter()
                quantize(src, dst, w, prepack)
                row = {"store": f"4-bit rtn{' --prepack' if prepack else ''}", "written": w,
                       "quantize_s": time.perf_counter() - t0, "read": {c: perplexity(dst, c, a) for c in caps}}
                res["stores"].append(row)
                print(f"{row['store']} written under {w}: " +
                      ", ".join(f"{c} {v['ppl']:.3f}" for c, v in row["read"].items()), file=sys.stderr)
    if not a.quick:
        res["costs"] = [costs(c, a.threads) for c in caps]
        import torch

        res["machine"] = f"{_cpu_model()}, torch {torch.__version__}, {os.cpu_count()} cpus"
        write_json_atomic(RESULTS / "cpu_capabilities.json", res)
    print(table(res))
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
