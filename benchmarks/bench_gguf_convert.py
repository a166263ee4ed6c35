"""What a GGUF expert costs to load on the CPU: its GGML blocks converted into torch's int4 layout, per expert.

    python benchmarks/bench_gguf_convert.py [--types Q4_0 Q4_K Q6_K Q8_0] [--threads 1 2] [--repeats 5]

One Mixtral-8x7B expert (w1, w3 [14336, 4096], w2 [4096, 14336]) of random blocks of each type (fp16 scales
of either sign: every block is a valid one) goes through GGMLCodec's fill, as a miss into a slot or a
load at start-up does (offload/ggml_codec.py). Beside it: a plain copy of the converted slot (what a miss
costs from a --prepack store or the converted-experts file) and one decoding token's product with the
expert (swiglu_fused). Warm-up first, then the median of --repeats. The load average is recorded with
each row: this machine is shared. Writes benchmarks/results/bench_gguf_convert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "bench_gguf_convert.json"
INTER, HIDDEN = 14336, 4096  # Mixtral-8x7B
FP16_AT = {"Q4_0": [0], "Q4_K": [0, 2], "Q6_K": [208], "Q8_0": [0], "Q5_K": [0, 2], "Q4_1": [0, 2]}


def blocks(name: str, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    from offload.ggml import BY_NAME, row_bytes

    t = BY_NAME[name]
    raw = np.frombuffer(rng.bytes(rows * row_bytes(t, cols)), np.uint8).reshape(rows, -1, t.nbytes).copy()
    for at in FP16_AT[name]:
        d = rng.normal(0, 0.01, raw.shape[:2]).astype(np.float16)
        raw[..., at : at + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    return torch.from_numpy(raw.reshape(rows, -1))


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def row(name: str, threads: int, repeats: int) -> dict:
    from mixtral_lite.model.experts import swiglu_fused
    from offload.ggml import BY_NAME
    from offload.ggml_codec import GGMLCodec
    from offload.packing import views
    from offload.store import Piece

    torch.set_num_threads(threads)
    t = BY_NAME[name]
    shapes = {"w1": (INTER, HIDDEN), "w2": (HIDDEN, INTER), "w3": (INTER, HIDDEN)}
    codec = GGMLCodec(shapes, [{m: t for m in shapes}], "cpu", stack={"w13": ("w1", "w3")}, order=("w1", "w3", "w2"))
    rng = np.random.default_rng(0)
    stored = torch.zeros(codec.layout.nbytes, dtype=torch.uint8)
    for e in codec.layout.entries:
        raw = blocks(name, *shapes[e.name], rng).reshape(-1)
        stored[e.offset : e.offset + raw.numel()].copy_(raw)
    slot, copy = (torch.empty(codec.slot_layout.nbytes, dtype=torch.uint8) for _ in range(2))
    sv = views(slot, codec.slot_layout)
    fill = codec.for_layer(0)
    x = torch.randn(1, HIDDEN)
    return {"type": name, "threads": threads, "requantized": not t.int4,
            "stored_mib": codec.layout.nbytes / 2**20, "slot_mib": codec.slot_layout.nbytes / 2**20,
            "convert_ms": median_ms(lambda: fill.fill([Piece(stored, 0)], sv), repeats),
            "copy_ms": median_ms(lambda: copy.copy_(slot), repeats),
            "product_ms": median_ms(lambda: swiglu_fused(x, *codec.decode(sv)), repeats),
            "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K", "Q6_K", "Q8_0"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    rows = []
    for name in a.types:
        for threads in a.threads:
            r = row(name, threads, a.repeats)
            rows.append(r)
            print(f"{name} {threads} thr: convert {r['convert_ms']:.0f} ms, copy {r['copy_ms']:.1f} ms, product "
                  f"{r['product_ms']:.1f} ms (load {r['load_average'][0]:.2f})", file=sys.stderr, flush=True)
    machine = (f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
               f"capability {torch.backends.cpu.get_cpu_capability()}")
    expert = {"w1": [INTER, HIDDEN], "w2": [HIDDEN, INTER], "w3": [INTER, HIDDEN]}
    a.out.write_text(json.dumps({"machine": machine, "expert": expert, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
