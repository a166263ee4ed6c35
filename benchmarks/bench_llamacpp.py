"""Decode tokens/s of mixtral_lite, transformers and llama.cpp on one checkpoint, in one run.

Same weights, same CPU, fp32, every expert resident, greedy decoding of the same prompt ids:

- mixtral_lite (`load_model` + `generate`),
- transformers' `generate`, as loaded (weights in the safetensors mmap) and with every weight
  cloned into ordinary memory (on this machine that alone changes its speed several-fold),
- llama.cpp through llama-cpp-python, on a GGUF written by gguf_export.py (fp32 weights,
  fp32 KV cache unless --llama-kv f16, n_threads = torch threads), greedy (top_k 1, temperature 0).

Before timing, llama.cpp's logits for the prompt are compared with mixtral_lite's (max abs diff).
Each engine is loaded once and warmed up once, then the engines take turns for `--repeats`
rounds; the median is the main figure, the best run is reported too (on a shared CPU the
fastest run is the one least disturbed by other work). Decode rate = n / (time from the first
generated token to the (n+1)-th, within one generation call from an empty cache): prefill is
excluded, every decode step includes its sampling. The CPU is shared, so read the ratios
(measured in the same run) more than the absolute rates.
Writes benchmarks/results/bench_llamacpp.json (not with --quick).

    python benchmarks/bench_llamacpp.py [-m CHECKPOINT] [-n 64] [--repeats 5] [--threads 1 2] [--quick]

Without -m: the shipped model if it exists, else a random checkpoint of its shape.
llama.cpp is skipped with a message when llama_cpp is not importable (pip install llama-cpp-python).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from gguf_export import export

from mixtral_lite import default_model_path
from mixtral_lite.generation.decode import generate_stream
from mixtral_lite.model.tokenizer import Tokenizer
from mixtral_lite.runtime.load import load_model
from mixtral_lite.runtime.runstats import write_json_atomic

RESULTS = Path(__file__).parent / "results"
PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.")
# The shipped Austen model's shape (tools/train_tiny_mixtral.py), for a random stand-in until it exists.
# initializer_range 0.1, not transformers' 0.02: at 0.02 the random model repeats one token forever,
# which would make the token-identity check vacuous; at 0.1 every step picks a different token.
SHIPPED_SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                     tie_word_embeddings=True, max_position_embeddings=4096, initializer_range=0.1)
GGML_TYPE_F32 = 0  # ggml's type id, for llama.cpp's KV cache type


def random_checkpoint(root: Path, **shape) -> Path:
    """A random MixtralForCausalLM (transformers) saved with the real Mistral tokenizer."""
    from importlib.resources import files

    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**shape)).save_pretrained(root)
    shutil.copy(Path(str(files("mistral_common") / "data" / "tokenizer.model.v1")), root / "tokenizer.model")
    return root


def decode_rate(stamps: list[float]) -> float:
    """Tokens/s between the first generated token and the last (prefill excluded)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def ours_engine(path: Path, prompt: list[int], n: int, window: int):
    model = load_model(path, dtype=torch.float32)

    def run() -> tuple[float, list[int]]:
        ids, stamps = [], []
        for step in generate_stream(model, [prompt], n + 1, window=window):  # what generate() iterates
            ids.append(int(step[0]))
            stamps.append(time.perf_counter())
        return decode_rate(stamps), ids
    return run


class _Stamps:
    """A transformers streamer that only records when each token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def transformers_engine(path: Path, prompt: list[int], n: int, clone: bool):
    """transformers as loaded (weights in the safetensors mmap) or with every weight cloned out of it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if clone:
        for param in model.parameters():
            param.data = param.data.clone()
    x = torch.tensor([prompt])

    @torch.inference_mode()
    def run() -> tuple[float, list[int]]:
        stamps = _Stamps()
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0,
                             max_new_tokens=n + 1, min_new_tokens=n + 1, streamer=stamps)
        return decode_rate(stamps.times[1:]), out[0, len(prompt):].tolist()
    return run


@contextmanager
def model_defaults(**fields):
    """Model parameters Llama() takes no argument for (use_extra_bufts: the CPU backend's weight
    repacking), set in the defaults it starts from while the block runs."""
    import llama_cpp.llama as high

    defaults = high.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        for k, v in fields.items():
            setattr(p, k, v)
        return p

    high.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        high.llama_cpp.llama_model_default_params = defaults


def open_llama(gguf: Path, n_ctx: int, kv: str, threads: int = 2, logits_all: bool = False, repack: bool = True,
               overrides: dict | None = None):
    """repack=False: multiply from the file's own blocks (llama.cpp's default interleaves Q4_0 matrices into
    a copy at load; its build on a 2026-12-02 machine whose CPU reports AMX crashed there on every Q4_0 file).
    overrides: GGUF metadata to replace at load (llama.cpp's --override-kv), e.g. {"llama.expert_used_count": 8}."""
    from llama_cpp import Llama

    kv_types = {} if kv == "f16" else dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    with model_defaults(use_extra_bufts=repack):
        return Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                     logits_all=logits_all, verbose=False, kv_overrides=overrides, **kv_types)


def llama_engine(gguf: Path, prompt: list[int], n: int, n_ctx: int, kv: str, threads: int, repack: bool = True,
                 overrides: dict | None = None):
    llm = open_llama(gguf, n_ctx, kv, threads, repack=repack, overrides=overrides)

    def run() -> tuple[float, list[int]]:
        llm.reset()  # empty KV cache: no reuse of the previous run's prompt
        ids, stamps = [], []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            ids.append(int(tok))
            stamps.append(time.perf_counter())
            if len(ids) == n + 1:
                break
        return decode_rate(stamps), ids
    return run


@torch.inference_mode()
def check_logits(path: Path, gguf: Path, prompt: list[int], n_ctx: int, kv: str) -> dict:
    """llama.cpp's logits at every prompt position against mixtral_lite's (fp32)."""
    ours = load_model(path, dtype=torch.float32)(torch.tensor([prompt]))[0].numpy()  # [T, V]
    llm = open_llama(gguf, n_ctx, kv, logits_all=True)
    llm.reset()
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[: len(prompt)], dtype=np.float32)  # [T, V]
    del llm
    return {"logits_max_abs_diff": float(np.abs(ours - theirs).max()),
            "logits_max_abs": float(np.abs(ours).max()),
            "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_engines(engines: dict, repeats: int) -> dict[str, tuple[list[float], list[int]]]:
    """Warm each engine up, then let them take turns `repeats` times (drift hits all alike)."""
    for fn in engines.values():
        fn()
    runs: dict[str, list] = {name: [] for name in engines}
    for r in range(repeats):
        for name, fn in engines.items():
            runs[name].append(fn())
            print(f"{torch.get_num_threads()} thread(s) round {r + 1}/{repeats} {name}: "
                  f"{runs[name][-1][0]:.1f} tok/s", file=sys.stderr)
    return {name: ([rate for rate, _ in rs], rs[0][1]) for name, rs in runs.items()}


def llama_cpp_available() -> str | None:
    """llama_cpp's version, or None (with a message) when it cannot be imported."""
    try:
        import llama_cpp
    except ImportError as e:
        print(f"llama.cpp skipped: llama_cpp is not importable ({e}); pip install llama-cpp-python",
              file=sys.stderr)
        return None
    return llama_cpp.__version__


def pick_model(args, tmp: Path) -> tuple[Path, str]:
    if args.model:
        return args.model, str(args.model)
    if args.quick:
        shape = SHIPPED_SHAPE | dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
        return random_checkpoint(tmp / "tiny", **shape), "random tiny (quick)"
    if default_model_path().is_dir():
        return default_model_path(), "shipped model (mixtral_lite/models/austen-mixtral)"
    print(f"{default_model_path()} does not exist yet: using a random checkpoint of its shape", file=sys.stderr)
    return random_checkpoint(tmp / "random", **SHIPPED_SHAPE), "random, shipped model's shape"


def weights_digest(path: Path) -> str:
    """First 16 hex digits of the SHA-256 of the checkpoint's safetensors files: which snapshot was timed."""
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def summarize(rates: dict, ids: dict) -> dict:
    med = {name: statistics.median(r) for name, r in rates.items()}
    best = {name: max(r) for name, r in rates.items()}
    out = {"tokens_per_s": med, "best_tokens_per_s": best, "runs_tokens_per_s": rates,
           "ratio_ours_over": {name: med["mixtral_lite"] / rate for name, rate in med.items()
                               if name != "mixtral_lite"},
           "best_ratio_ours_over": {name: best["mixtral_lite"] / rate for name, rate in best.items()
                                    if name != "mixtral_lite"},
           "same_tokens_as_ours": {name: seq == ids["mixtral_lite"] for name, seq in ids.items()
                                   if name != "mixtral_lite"},
           "first_divergence_from_ours": {name: first_divergence(ids["mixtral_lite"], seq)
                                          for name, seq in ids.items() if name != "mixtral_lite"},
           "generated_ids": ids}
    return out


def make_engines(path: Path, prompt: list[int], n: int, n_ctx: int, gguf: Path | None, kv: str,
                 threads: int) -> dict:
    torch.set_num_threads(threads)
    engines = {"mixtral_lite": ours_engine(path, prompt, n, n_ctx),
               "transformers": transformers_engine(path, prompt, n, clone=False),
               "transformers_cloned": transformers_engine(path, prompt, n, clone=True)}
    if gguf is not None:
        engines["llama_cpp"] = llama_engine(gguf, prompt, n, n_ctx, kv, threads)
    return engines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", type=Path, help="HF Mixtral checkpoint folder")
    p.add_argument("-n", "--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+",
                   help="thread counts, each timed as its own group, torch and llama.cpp alike (default: 1 2; "
                        "--quick: 1). On a busy 2-core machine threads that spin at barriers make 2 slower than 1")
    p.add_argument("--llama-kv", default="f32", choices=["f32", "f16"], help="llama.cpp's KV cache type")
    p.add_argument("--quick", action="store_true", help="tiny random checkpoint, few tokens, no JSON file")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_llamacpp.json")
    args = p.parse_args(argv)
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    if args.repeats < 1 or args.tokens < 1 or min(args.threads) < 1:
        p.error("--repeats, --tokens and --threads must be at least 1")
    n, repeats = (4, min(args.repeats, 2)) if args.quick else (args.tokens, args.repeats)
    version = llama_cpp_available()
    with tempfile.TemporaryDirectory() as tmp:
        path, label = pick_model(args, Path(tmp))
        prompt = Tokenizer.from_dir(path).encode(PROMPT)
        n_ctx = len(prompt) + n + 16
        result = {"benchmark": "llamacpp", "model": label, "weights_sha256": weights_digest(path),
                  "dtype": "float32", "prompt_tokens": len(prompt),
                  "tokens": n, "repeats": repeats, "llama_cpp_python": version, "llama_kv_cache": args.llama_kv,
                  "machine": f"{platform.machine()} {os.cpu_count()} cpus", "load_average_start": os.getloadavg()}
        gguf = None
        if version:
            gguf = export(path, Path(tmp) / "model.gguf", "f32")
            result |= check_logits(path, gguf, prompt, n_ctx, args.llama_kv)
            print(f"logits vs mixtral_lite: max abs diff {result['logits_max_abs_diff']:.2e} "
                  f"(max |logit| {result['logits_max_abs']:.2f})", file=sys.stderr)
        result["by_threads"] = {}
        for threads in args.threads:
            runs = run_engines(make_engines(path, prompt, n, n_ctx, gguf, args.llama_kv, threads), repeats)
            group = summarize({k: r for k, (r, _) in runs.items()}, {k: ids for k, (_, ids) in runs.items()})
            print_table(threads, group)
            result["by_threads"][str(threads)] = group
    result["load_average_end"] = os.getloadavg()
    if not args.quick:
        write_json_atomic(args.out, result)
    print(json.dumps(result))


def print_table(threads: int, result: dict) -> None:
    med, best, ratio = result["tokens_per_s"], result["best_tokens_per_s"], result["ratio_ours_over"]
    print(f"{threads} thread(s): {'engine':>20} {'median':>8} {'best':>8} tok/s", file=sys.stderr)
    for name, rate in med.items():
        extra = "" if name == "mixtral_lite" else (
            f"  ours/{name} {ratio[name]:.2f}x  same tokens: {result['same_tokens_as_ours'][name]}"
            f" (first divergence: {result['first_divergence_from_ours'][name]})")
        print(f"{'':12}{name:>20} {rate:8.1f} {best[name]:8.1f}{extra}", file=sys.stderr)


if __name__ == "__main__":
    main()
