"""Decode tokens/s of mixtral_lite against transformers' generate, same weights, device, dtype.

Both run greedy decoding of the same prompt with every expert resident; each is warmed
up once, then timed `--repeats` times, and the medians are compared in one run (absolute
times drift on a shared machine, the ratio much less). Writes JSON to benchmarks/results/.

    python benchmarks/bench_decode.py [-m CHECKPOINT] [-n 64] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixtral_lite import default_model_path
from mixtral_lite.generate import generate
from mixtral_lite.model import load_model
from mixtral_lite.runstats import write_json_atomic

RESULTS = Path(__file__).parent / "results"


def time_ours(path: Path, prompt: list[int], n: int, dtype) -> tuple[float, list[int]]:
    model = load_model(path, dtype=dtype)
    t0 = time.perf_counter()
    out = generate(model, [prompt], 1, window=4096)  # prefill + first token
    t1 = time.perf_counter()
    out = generate(model, [prompt], n + 1, window=4096)[0]
    t2 = time.perf_counter()
    return n / ((t2 - t1) - (t1 - t0)), out


def time_transformers(path: Path, prompt: list[int], n: int, dtype, copy_weights: bool = False):
    """transformers as a user gets it; copy_weights=True also times it with every weight copied
    out of the memory-mapped file into ordinary memory (on this machine that alone is ~3x faster)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if copy_weights:
        for param in model.parameters():
            param.data = param.data.clone()
    x = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)[0, len(prompt):].tolist()
        t2 = time.perf_counter()
    return n / ((t2 - t1) - (t1 - t0)), out


def median_rate(fn, repeats: int, *args) -> tuple[float, list[int]]:
    fn(*args)  # warm-up
    runs = [fn(*args) for _ in range(repeats)]
    return statistics.median(r for r, _ in runs), runs[0][1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", type=Path)
    p.add_argument("-n", "--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--quick", action="store_true", help="tiny random checkpoint, few tokens")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_decode.json")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or (_tiny_checkpoint(Path(tmp)) if args.quick else default_model_path())
        n = 8 if args.quick else args.tokens
        prompt = list(range(100, 116))
        ours, ids_ours = median_rate(time_ours, args.repeats, path, prompt, n, dtype)
        ref, ids_ref = median_rate(time_transformers, args.repeats, path, prompt, n, dtype)
        ref_copied, _ = median_rate(time_transformers, args.repeats, path, prompt, n, dtype, True)
    result = {"benchmark": "decode", "model": str(path), "dtype": args.dtype, "tokens": n,
              "mixtral_lite_tokens_per_s": ours, "transformers_tokens_per_s": ref, "ratio": ours / ref,
              "transformers_copied_weights_tokens_per_s": ref_copied, "ratio_vs_copied_weights": ours / ref_copied,
              "same_tokens": ids_ours == ids_ref, "torch_threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads"}
    print(f"mixtral_lite {ours:.1f} tok/s   transformers {ref:.1f} tok/s   ratio {ours / ref:.2f}x   "
          f"(vs transformers with weights copied out of the mmap: {ours / ref_copied:.2f}x)   "
          f"identical tokens: {ids_ours == ids_ref}", file=sys.stderr)
    if not args.quick:
        write_json_atomic(args.out, result)
    print(json.dumps(result))


def _tiny_checkpoint(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from refs import save_reference

    return save_reference(root / "tiny")[1]


if __name__ == "__main__":
    main()
