"""Offloaded decoding on a Mixtral-shaped checkpoint: per-token time split into compute and stall.

For K = 2..8 expert slots per layer, prefetch off/next, store ram/mmap: the same text is
fed token by token (teacher forcing, so every configuration sees the same routing) after
a prefill; the first `--warmup` decode steps fill the cache and are not counted. Per step
it records wall time and the transfer stall (on CPU: the copy time itself; on CUDA: the
compute stream's measured wait), and over the counted steps: hit rate, bytes host->device
per token and prefetch recall. Medians over steps; JSON and a PNG to benchmarks/results/.

    python benchmarks/bench_offload.py [-m CHECKPOINT] [--quick] [--routing model|trace] [--device cpu]

`--routing trace` replays recorded Mixtral-8x7B-Instruct expert choices (HumanEval decode,
../shared/data/routing) in place of the random model's: realistic hit rates and bytes, with
an oracle guess for prefetch (its ceiling). On CPU every copy blocks, so stall = copy time
whether prefetched or not; on CUDA prefetch copies overlap compute on the copy stream.

Without -m it writes `tools/make_synthetic_checkpoint.py --preset mixtral-1/8` (L=32, E=8,
D=512, I=1792; 5.5 MB per bf16 expert) into --work-dir once and reuses it. The weights are
random, so routing (and hence hit rates and recall) is that of a random model, not Mixtral's.
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
from collections import Counter, defaultdict
from pathlib import Path

import torch

from mixtral_lite.model.checkpoint import Checkpoint
from mixtral_lite.model.config import DTYPES
from mixtral_lite.model.experts import expert_function
from mixtral_lite.model.tokenizer import Tokenizer
from mixtral_lite.runtime.load import load_model
from mixtral_lite.runtime.offloading import OffloadedExperts, make_factory, open_experts
from offload.engine import OffloadEngine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEXT = ROOT.parent / "shared" / "data" / "corpus" / "austen-valid.txt"
TRACE = ROOT.parent / "shared" / "data" / "routing" / "mixtral-8x7b-instruct" / "humaneval-decode.jsonl"


def checkpoint(args) -> Path:
    if args.model:
        return args.model
    path = args.work_dir / f"mixtral-1-8-{args.dtype}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_checkpoint.py"), str(path),
                        "--preset", "mixtral-1/8", "--dtype", args.dtype], check=True)
    return path


def text_tokens(path: Path, n: int, text: Path = TEXT) -> list[int]:
    tok = Tokenizer.from_dir(path)
    ids = tok.encode(text.read_text(encoding="utf-8")[:20000]) if text.is_file() else []
    if not text.is_file():
        print(f"note: --text {text} not found: the prompt is seeded random ids", file=sys.stderr)
    if len(ids) < n:  # no corpus: seeded random ids
        ids = torch.randint(3, tok.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    return ids[:n]


def load_trace(path: Path, layers: int) -> list[list[list[int]]]:
    """rows[token][layer]: recorded top-2 of the trace's longest problem.

    Each layer's records are taken in token order on their own; the recorder's gaps (about
    1-2% of records, see the data README) shift a layer by one token after the gap, and
    all layers are cut to the shortest one.
    """
    seqs: dict[tuple[int, int], list] = defaultdict(list)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            seqs[(r["problem_id"], r["layer"])].append((r["token_idx"], r["experts"]))
    problems = {p for p, _ in seqs}
    best = max(problems, key=lambda p: min(len(seqs[(p, layer)]) for layer in range(layers)))
    per_layer = [[e for _, e in sorted(seqs[(best, layer)])] for layer in range(layers)]
    return [[per_layer[layer][t] for layer in range(layers)] for t in range(min(map(len, per_layer)))]


class TraceRouted:
    """Provider wrapper: the model's expert choices replaced by recorded Mixtral-8x7B ones.

    The mixing weights stay the model's. The guess for layer l+1 is the recorded choice
    itself: an oracle, so prefetch numbers in this mode are the ceiling of speculation.
    """

    def __init__(self, inner: OffloadedExperts, rows: list[list[list[int]]]):
        self.inner, self.rows, self.pos = inner, rows, 0

    @property
    def wants_guess(self) -> bool:
        return self.inner.wants_guess

    def run(self, layer, x, ids, weights, next_guess=None):
        rows = self.rows[self.pos : self.pos + x.shape[0]]
        ids = torch.tensor([r[layer] for r in rows], device=x.device)
        if next_guess is not None:
            next_guess = torch.tensor([r[layer + 1] for r in rows], device=x.device)
        if layer == len(rows[0]) - 1:
            self.pos += x.shape[0]
        return self.inner.run(layer, x, ids, weights, next_guess)


def counters(engine: OffloadEngine) -> dict:
    c, p = engine.counters, engine.prefetcher
    return dict(hits=c.hits, misses=c.misses, bytes=engine.transfer.bytes_copied,
                rh=p.recall_hits, rt=p.recall_total, issued=p.issued, used=p.used)


def measure(model, engine: OffloadEngine, ids: list[int], prompt: int, warmup: int, device):
    """Prefill `prompt` tokens, then decode the rest teacher-forced.

    Returns the counted steps' (wall s, stall s) and the counters' change over them.
    """
    cache = model.new_cache(1, len(ids) + 1)
    cache.reset(torch.zeros(1, dtype=torch.long, device=device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model(torch.tensor([ids[:prompt]], device=device), cache, last_only=True)
        steps, before = [], None
        for i, t in enumerate(ids[prompt:]):
            if i == warmup:
                before = counters(engine)
            s0 = engine.transfer.stall_seconds()
            sync()
            t0 = time.perf_counter()
            model(torch.tensor([[t]], device=device), cache)
            sync()
            steps.append((time.perf_counter() - t0, engine.transfer.stall_seconds() - s0))
    after = counters(engine)
    return steps[warmup:], {k: after[k] - before[k] for k in after}


def summarize(steps: list[tuple[float, float]], d: dict) -> dict:
    """Medians over steps (pooled over repeats) and per-token rates from the counters."""
    n = len(steps)
    return {
        "token_ms": 1e3 * statistics.median(a for a, _ in steps),
        "stall_ms": 1e3 * statistics.median(b for _, b in steps),
        "compute_ms": 1e3 * statistics.median(a - b for a, b in steps),
        "hit_rate": d["hits"] / (d["hits"] + d["used"] + d["misses"]),  # uses a prefetch served are not hits
        "bytes_per_token": d["bytes"] / n,
        "misses_per_token": d["misses"] / n,
        "prefetch_loads_per_token": d["issued"] / n,
        "prefetch_used_per_token": d["used"] / n,
        "prefetch_recall": d["rh"] / d["rt"] if d["rt"] else None,
        "decode_steps": n,
    }


def plot(rows: list[dict], meta: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    for (store, pf), style in zip([("ram", "next"), ("ram", "off"), ("mmap", "next"), ("mmap", "off")],
                                  ["-o", "--o", "-s", "--s"], strict=True):
        sel = sorted((r for r in rows if r["store"] == store and r["prefetch"] == pf), key=lambda r: r["k"])
        ks = [r["k"] for r in sel]
        label = f"{store}, prefetch {pf}"
        axes[0].plot(ks, [r["token_ms"] for r in sel], style, label=label)
        axes[1].plot(ks, [r["stall_ms"] for r in sel], style, label=label)
        axes[2].plot(ks, [r["bytes_per_token"] / 1e6 for r in sel], style, label=label)
        axes[3].plot(ks, [r["hit_rate"] for r in sel], style, label=label)
    titles = ["ms per token (median)", "of which stall, ms", "MB host->device per token", "hit rate"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("expert slots per layer K")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"offloaded decode, {meta['model']}, {meta['routing']} routing ({meta['device']}, {meta['dtype']}, "
                 f"{meta['threads']} threads, {meta['expert_mb']:.1f} MB/expert)")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)


def sweep(model, ckpt, args, device, dtype, ids: list[int], trace) -> list[dict]:
    """Every (store, K, prefetch), `--repeats` times; steps and counters pooled per configuration."""
    pooled: dict[tuple, tuple[list, Counter]] = {}
    for store in ("ram", "mmap"):
        t0 = time.perf_counter()
        host, codec = open_experts(model.config, ckpt, store, device, dtype)
        print(f"{store} store ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for _ in range(args.repeats):
            for k in args.k:
                for pf in ("next", "off"):
                    engine = OffloadEngine(host, codec, expert_function(codec), k, device, prefetch=pf == "next")
                    provider = OffloadedExperts(engine, pf == "next")
                    model.experts = TraceRouted(provider, trace) if trace else provider
                    steps, d = measure(model, engine, ids, args.prompt, args.warmup, device)
                    acc = pooled.setdefault((store, k, pf), ([], Counter()))
                    acc[0].extend(steps)
                    acc[1].update(d)
                    print(f"{store} K={k} prefetch {pf}: {1e3 * statistics.median(a for a, _ in steps):.1f} "
                          "ms/token", file=sys.stderr)
        del host, codec
    return [{"store": store, "k": k, "prefetch": pf, **summarize(steps, d)}
            for (store, k, pf), (steps, d) in pooled.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", type=Path, help="checkpoint folder (default: a synthetic mixtral-1/8)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/mixtral_lite_bench"))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: oversubscribed cores make OpenMP spin)")
    ap.add_argument("--routing", choices=["model", "trace"], default="model",
                    help="experts chosen by the (random) model's routers, or replayed from --trace")
    ap.add_argument("--trace", type=Path, default=TRACE, help="recorded Mixtral-8x7B routing (jsonl)")
    ap.add_argument("--prompt", type=int, default=32, help="prefill tokens")
    ap.add_argument("--text", type=Path, default=TEXT, help="prompt text (default: ../shared/.../austen-valid.txt)")
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens, warm-up included")
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="sweeps; steps pooled (spreads load bursts)")
    ap.add_argument("--k", type=int, nargs="+", default=list(range(2, 9)))
    ap.add_argument("--quick", action="store_true", help="24 tokens (8 warm-up), prompt 16, 1 sweep: minutes")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the PNG of an earlier run")
    args = ap.parse_args()
    if args.replot:
        data = json.loads(args.replot.read_text())
        plot(data["rows"], data["meta"], args.replot.with_suffix(".png"))
        print(table(data["rows"]))
        return
    if args.quick:
        args.tokens, args.warmup, args.prompt, args.repeats = 24, 8, 16, 1
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    path = checkpoint(args)
    ids = text_tokens(path, args.prompt + args.tokens, args.text)
    model = load_model(path, device=device, dtype=dtype, experts=make_factory(slots=2, store="mmap"))
    cfg = model.config
    trace = load_trace(args.trace, cfg.num_layers) if args.routing == "trace" else None
    if trace is not None and (len(trace) < len(ids) or max(e for r in trace for p in r for e in p) >= cfg.num_experts):
        raise SystemExit(f"error: --trace {args.trace}: {len(trace)} tokens, need {len(ids)} and ids < "
                         f"{cfg.num_experts}")
    rows = sweep(model, Checkpoint(path), args, device, dtype, ids, trace)
    meta = {"model": str(path.name), "device": args.device, "dtype": args.dtype, "threads": args.threads,
            "routing": args.routing, "trace": str(args.trace) if trace else None,
            "prompt_tokens": args.prompt, "decode_tokens": args.tokens, "warmup": args.warmup,
            "repeats": args.repeats, "expert_mb": 3 * cfg.hidden_size * cfg.intermediate_size * dtype.itemsize / 1e6,
            "layers": cfg.num_layers, "experts": cfg.num_experts, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "quick": args.quick}
    name = "bench_offload" + ("_trace" if trace else "") + ("_quick" if args.quick else "")
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, out)
    plot(rows, meta, out.with_suffix(".png"))
    print(table(rows))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)


def table(rows: list[dict]) -> str:
    head = "| store | K | prefetch | ms/token | compute ms | stall ms | MB/token | hit rate | recall |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        rec = "-" if r["prefetch_recall"] is None else f"{r['prefetch_recall']:.2f}"
        lines.append(f"| {r['store']} | {r['k']} | {r['prefetch']} | {r['token_ms']:.1f} | {r['compute_ms']:.1f} "
                     f"| {r['stall_ms']:.1f} | {r['bytes_per_token'] / 1e6:.1f} | {r['hit_rate']:.3f} | {rec} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
