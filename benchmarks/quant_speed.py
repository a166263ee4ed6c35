"""Seconds per full-size expert matrix for each quantization method, and the projected time for all of
Mixtral-8x7B (768 expert matrices + 32 layers of attention, ~23 matrix-equivalents) on this machine.

    python benchmarks/quant_speed.py [--shape 14336 4096] [--threads 1 2] [--skip-hqq] [--out JSON]

Rows: hqq's own optimiser (`--method hqq`), the chunked optimiser (`--method hqq-fast`, offload/hqq_fast.py)
at several chunk sizes and iteration caps, and round-to-nearest (`--method rtn`). Each row times the
scale/zero search plus the packing quantize_matrix does, on a seeded N(0, 0.02) matrix in bf16 precision
(make_synthetic_checkpoint's weights), and reports the mean |W - dequant(W)| against hqq's (the quality
proxy; perplexity of the shipped settings is benchmarks/quant_quality.py's job).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from offload import hqq_fast
from offload.quant import QuantSpec, _grid, _rtn, quantize_matrix

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quant_speed.json"
MATRICES = 768 + 23  # experts' w1/w2/w3 x 256, and attention (1.34B weights) in 58.7M-weight equivalents


def weight_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> float:
    wg = w.reshape(-1, spec.group_size)
    q = (wg / scale + zero).round_().clamp_(0, 2**spec.bits - 1)
    return float(((q - zero) * scale - wg).abs().mean())


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def rows_for(w: torch.Tensor, spec: QuantSpec, skip_hqq: bool) -> list[dict]:
    from hqq.core.quantize import Quantizer

    rows, ref = [], None
    if not skip_hqq:
        s, (_, meta) = timed(lambda: Quantizer.quantize(w, nbits=spec.bits, channel_wise=True,
                                                        group_size=spec.group_size, optimize=True,
                                                        round_zero=spec.bits == 4, axis=1, bitpack=False,
                                                        device="cpu"))
        ref = weight_error(w, meta["scale"], meta["zero"], spec)
        rows.append({"method": "hqq", "search_s": s, "weight_error": ref})
    for chunk, iters in ((1024, 20), (4096, 20), (16384, 20), (4096, 10), (4096, 5), (4096, 2)):
        s, (scale, zero) = timed(lambda c=chunk, i=iters: hqq_fast.hqq_axis1(w, spec.bits, spec.group_size,
                                                                              spec.bits == 4, i, c))
        rows.append({"method": "hqq-fast", "chunk": chunk, "iters": iters, "search_s": s,
                     "weight_error": weight_error(w, scale, zero, spec)})
    scale, zero = _rtn(w, spec, *_grid(tuple(w.shape), spec))  # quantize_matrix's own rtn search
    rows.append({"method": "rtn", "search_s": 0.0, "weight_error": weight_error(w, scale, zero, spec)})
    # the whole of quantize_matrix (search + 8-bit metadata + re-rounding + packing) for the shipped methods
    rtn_s, _ = timed(lambda: quantize_matrix(w, spec, "w", "cpu", "rtn"))  # rtn's search is ~free: the rest
    for r in rows:
        if r["method"] == "rtn":
            r["matrix_s"] = rtn_s
        elif r["method"] == "hqq-fast" and r["chunk"] == 4096 and r["iters"] == 20:
            r["matrix_s"], _ = timed(lambda: quantize_matrix(w, spec, "w", "cpu", "hqq-fast"))
        elif r["method"] == "hqq":
            r["matrix_s"] = r["search_s"] + rtn_s  # hqq's search, then the same metadata/re-rounding/packing
        r["relative_error"] = r["weight_error"] / ref if ref else None
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=[14336, 4096])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-hqq", action="store_true", help="no hqq reference row (26-98 s per matrix)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    from mixtral_lite.runtime.runstats import write_json_atomic

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(a.shape, generator=gen) * 0.02).bfloat16().float()
    result = {"shape": a.shape, "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
              "matrices_full_model": MATRICES, "rows": []}
    for t in a.threads:
        torch.set_num_threads(t)
        for spec in (QuantSpec(4, 64), QuantSpec(2, 32)):
            for r in rows_for(w, spec, a.skip_hqq):
                r |= {"threads": t, "bits": spec.bits, "group": spec.group_size}
                if "matrix_s" in r:
                    r["full_model_min"] = r["matrix_s"] * MATRICES / 60
                result["rows"].append(r)
                print(r, file=sys.stderr, flush=True)
                write_json_atomic(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
