"""Aten ops (and time) of one decoding step on the CPU: the eager step against the lean one, per token and per layer.

    python benchmarks/bench_cpu_step.py [--configs NAME ...] [--threads 1] [--steps 64] [--window 512]
                                        [--workdir DIR] [--quick] [--json]

Two paths through the same model, for the same greedy steps after the same 32-token prompt:

  eager   Transformer.forward with one token (the general path: prefill, and the reference)
  lean    Transformer.decode (what generation runs for every step after the prompt; absent on trees
          older than it, which then report the eager path alone: run this script against such a tree
          with PYTHONPATH=that-tree to measure "before")

Configurations (the models of benchmarks/bench_fused.py, made by its `checkpoint` and `store` into --workdir):

  shipped fp32            the shipped checkpoint, float32, every expert resident (F.linear products)
  shipped 4-bit           its 4-bit store (hqq), every expert cached on the fused int4 kernel
  shipped fp32 K=4        the checkpoint through the offload engine, 4 slots per layer
  mixtral-1/8 4-bit       the Mixtral-shaped scaled model (32 layers), 4-bit store, every expert cached
  mixtral-1/8 4-bit K=4   the same through the offload engine, 4 slots per layer
  (--quick: the first two, 4 steps)

What is counted, for one step after the warm-up:

  ops       every aten op the step dispatches, seen by a TorchDispatchMode: the ops the Python code issues,
            views and no-op casts included (an op such as rms_norm that runs further aten ops inside counts once)
  compute   the same without the views and other aliases (view, slice, select, narrow, unbind, ...)
  profiler  every aten::* event torch.profiler records for the step, the nested ones included
  per layer: what runs inside the layers' Block.forward / Block.decode (attention, router, the experts'
  products and their glue), averaged over the layers; "outside": embedding, RoPE, cache bookkeeping, final
  norm, lm_head. Time: median ms per step over --steps steps, the two paths' steps interleaved (indicative:
  time it on a quiet machine; a path's figures are per step, with its own cache and greedy tokens).

Every step's logits of the lean path are compared with the eager path's, bit for bit ("bitwise" in the JSON).
Writes benchmarks/results/bench_cpu_step.json (--quick: bench_cpu_step-quick.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
PROMPT_LEN = 32
ALIASES = {"view", "_unsafe_view", "reshape", "slice", "select", "narrow", "unbind", "split", "split_with_sizes",
           "chunk", "transpose", "t", "unsqueeze", "squeeze", "expand", "as_strided", "permute", "alias", "detach",
           "resolve_conj", "resolve_neg"}  # ops that make a view (or return their input): no arithmetic
CONFIGS = {  # name: (model, quantized, slots)
    "shipped fp32": ("shipped", False, None),
    "shipped 4-bit": ("shipped", True, None),
    "shipped fp32 K=4": ("shipped", False, 4),
    "mixtral-1/8 4-bit": ("mixtral-1/8", True, None),
    "mixtral-1/8 4-bit K=4": ("mixtral-1/8", True, 4),
}
QUICK = ("shipped fp32", "shipped 4-bit")


class OpCounter:
    """Counts the aten ops dispatched while active, by op name and by section (a layer, or "outside")."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops[(counter.section, func.__name__.split(".")[0])] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.ops: collections.Counter = collections.Counter()
        self.section = "outside"

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def in_layers(self, model):
        """Label the ops of each layer's Block.forward/decode by the layer (instance attributes, removed by `done`)."""
        for i, block in enumerate(model.layers):
            for name in ("forward", "decode"):
                fn = getattr(block, name, None)
                if fn is not None:
                    setattr(block, name, self._labelled(fn, i))
        return self

    def _labelled(self, fn, layer: int):
        def run(*args, **kwargs):
            outer, self.section = self.section, layer
            try:
                return fn(*args, **kwargs)
            finally:
                self.section = outer
        return run

    @staticmethod
    def done(model) -> None:
        for block in model.layers:
            for name in ("forward", "decode"):
                block.__dict__.pop(name, None)

    def summary(self, layers: int) -> dict:
        total = sum(self.ops.values())
        inside = sum(n for (sec, _), n in self.ops.items() if sec != "outside")
        compute = sum(n for (_, op), n in self.ops.items() if op not in ALIASES)
        compute_in = sum(n for (sec, op), n in self.ops.items() if sec != "outside" and op not in ALIASES)
        by_op = collections.Counter()
        for (sec, op), n in self.ops.items():
            if sec != "outside":
                by_op[op] += n
        return {"ops_per_token": total, "ops_per_layer": inside / layers, "ops_outside_layers": total - inside,
                "compute_ops_per_token": compute, "compute_ops_per_layer": compute_in / layers,
                "per_layer_by_op": {op: round(n / layers, 2) for op, n in by_op.most_common()}}


def profiler_events(step) -> int:
    """aten::* events torch.profiler records while step() runs (nested ones included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def load(name: str, workdir: Path):
    import torch
    from bench_fused import checkpoint, store

    from mixtral_lite.runtime import offloading
    from mixtral_lite.runtime.load import load_model

    model_name, quantized, slots = CONFIGS[name]
    src = checkpoint(model_name, workdir)
    path = store(src, workdir, "hqq") if quantized else src
    factory = offloading.make_factory(slots=slots) if slots else None
    return load_model(path, dtype=torch.float32, experts=factory), str(path)


class Run:
    """One path's own cache and last logits: each step feeds back its own greedy token."""

    def __init__(self, model, name: str, prompt: list[int], window: int):
        import torch

        self.fn = model.forward if name == "eager" else model.decode
        self.cache = model.new_cache(1, window)
        self.cache.reset()
        self.logits = model(torch.tensor([prompt]), self.cache, last_only=True)
        self.seen = []

    def step(self) -> None:
        self.logits = self.fn(self.logits[:, -1].argmax(-1, keepdim=True), self.cache)
        self.seen.append(self.logits[0, -1].clone())


def measure(name: str, workdir: Path, window: int, warmup: int, steps: int) -> dict:
    """Both paths in lockstep from the same prompt: `warmup` steps, one counted step, one profiled step, then
    `steps` timed steps, the two paths' calls interleaved (alternating which goes first), so that the machine's
    drift weighs on both alike."""
    import torch
    from generate_runners import prompts

    model, path = load(name, workdir)
    prompt = prompts(1, model.config.vocab_size)[0][:PROMPT_LEN]
    names = ["eager"] + (["lean"] if hasattr(model, "decode") else [])
    # an offloaded model's expert cache is state: each path gets its own model, so that both see the same
    # hits and misses at the same step (counted misses convert experts: ops of their own)
    models = {n: model if i == 0 or CONFIGS[name][2] is None else load(name, workdir)[0] for i, n in enumerate(names)}
    got = {}
    with torch.inference_mode():
        paths = {n: Run(models[n], n, prompt, window) for n in names}
        for _ in range(warmup):
            for p in paths.values():
                p.step()
        for n, p in paths.items():
            counter = OpCounter().in_layers(models[n])
            try:
                with counter:
                    p.step()
            finally:
                OpCounter.done(models[n])
            got[n] = counter.summary(model.config.num_layers)
            got[n]["profiler_events_per_token"] = profiler_events(p.step)
        times = {n: [] for n in names}
        for i in range(steps):
            for n in names if i % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                paths[n].step()
                times[n].append(time.perf_counter() - t0)
    for n in names:
        got[n]["ms_per_step"] = 1e3 * statistics.median(times[n])
    row = {"config": name, "path": path, "layers": model.config.num_layers, "experts": type(model.experts).__name__,
           "steps": got}
    if "lean" in paths:
        pairs = zip(paths["eager"].seen, paths["lean"].seen, strict=True)
        row["bitwise"] = all(torch.equal(a, b) for a, b in pairs)
    return row


def markdown(rows: list[dict]) -> str:
    out = ["| configuration | path | ops/token | ops/layer | compute ops/layer | ops outside layers "
           "| profiler events/token | ms/step | bitwise |", "|" + "---|" * 9]
    for r in rows:
        for p, s in r["steps"].items():
            out.append(f"| {r['config']} | {p} | {s['ops_per_token']} | {s['ops_per_layer']:.1f} "
                       f"| {s['compute_ops_per_layer']:.1f} | {s['ops_outside_layers']} "
                       f"| {s['profiler_events_per_token']} | {s['ms_per_step']:.2f} | {r.get('bitwise', '-')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), metavar="NAME",
                   help=f"of {list(CONFIGS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=64, help="timed steps of each path (after 4 warm-up steps)")
    p.add_argument("--window", type=int, default=512, help="KV window")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mixtral-lite-bench")
    p.add_argument("--quick", action="store_true", help=f"{' and '.join(QUICK)}, 4 timed steps")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    a = p.parse_args(argv)
    if a.quick:
        a.configs, a.steps = list(QUICK), 4
    import torch

    torch.set_num_threads(a.threads)
    a.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.configs:
        rows.append(measure(name, a.workdir, a.window, 4, a.steps))
        print(f"{name}: " + ", ".join(f"{k} {s['ops_per_layer']:.1f} ops/layer, {s['ms_per_step']:.2f} ms"
                                      for k, s in rows[-1]["steps"].items()), file=sys.stderr)
    from bench_fused import capability, cpu_model

    from mixtral_lite.runtime.runstats import write_json_atomic

    result = {"machine": f"{cpu_model()}, {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
              "cpu_capability": capability(), "threads": a.threads, "prompt_tokens": PROMPT_LEN, "window": a.window,
              "timed_steps": a.steps, "rows": rows}
    write_json_atomic(RESULTS / f"bench_cpu_step{'-quick' if a.quick else ''}.json", result)
    print(markdown(rows))
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
