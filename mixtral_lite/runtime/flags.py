"""The flags a load is made of, defined once for every front end, without importing torch (fast --help).

    add_model_args      -m -c -b -t --device --dtype + add_offload_args   (generate, chat, server)
    add_offload_args    --experts-per-layer --store --prefetch --device-memory --cache-policy --expert-pool
                        --miss-policy --cpu-threads                       (+ perplexity)
    add_sampling_args   --temperature --top-k --top-p -s                  (generate, chat)
    Parser              argparse with one-line errors: a mistyped flag names the closest valid one

Their values are read in one place, `runtime.plan.plan_load`, into the plan every load walks down.
"""

from __future__ import annotations

import argparse
import difflib
import math
import secrets
import sys
from pathlib import Path

from offload.miss_policy import MISS_POLICIES
from offload.policy import POLICIES, make_policy

READ = "read"  # --miss-policy read: offload/table.py (CUDA)
DTYPE_NAMES = ("bfloat16", "float16", "float32")  # = sorted(model.config.DTYPES), without importing torch


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): `--tempreature` says "did you mean --temperature?"."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{self.hint(message)}\n")

    def hint(self, message: str) -> str:
        """' (did you mean --x?)' for the first unknown flag close to a real one; where the flags are listed."""
        if message.startswith("unrecognized arguments: "):
            for word in message.removeprefix("unrecognized arguments: ").split():
                close = difflib.get_close_matches(word.split("=")[0], list(self._option_string_actions), n=1)
                if word.startswith("-") and close:
                    return f" (did you mean {close[0]}?)"
        if message.startswith(("unrecognized", "the following arguments are required")):
            return " (--help lists every flag)"
        return ""


def int_range(lo: int | None = None, hi: int | None = None, what: str = "an integer"):
    """argparse type: an integer in [lo, hi]; the message says the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be {what}")
        return value
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (rejects nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


POSITIVE = int_range(1, what=">= 1")
NON_NEGATIVE = int_range(0, what=">= 0")
SEED = int_range(-1, (1 << 64) - 1, what="-1 (random) or between 0 and 2**64 - 1")


def add_model_args(p: argparse.ArgumentParser, shipped_offloads_on_cpu: bool = False) -> None:
    """The flags of every command that loads a model to generate with (generate, server, chat); the chat and
    the server offload the shipped model on the CPU too (runtime/plan.py), and their help says so."""
    p.add_argument("-m", "--model", type=Path, help="checkpoint folder, quantized store or GGUF file (default: the "
                   "shipped Austen model)")
    p.add_argument("-c", "--ctx-size", type=POSITIVE, default=4096,
                   help="KV window when the model has no sliding_window; a window shorter than the "
                        "text is an approximation (Mixtral-8x7B has no sliding window)")
    p.add_argument("-b", "--batch-size", type=POSITIVE, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("-t", "--threads", type=POSITIVE,
                   help="CPU threads for torch (default: the physical cores, fewer when others are busy)")
    add_device_args(p)
    p.add_argument("--cuda-graphs", choices=["on", "off"], default="on",
                   help="replay each decoding step as one CUDA graph where the experts are routed on the "
                        "device (--miss-policy read, dense models); off: the eager step")
    add_offload_args(p, shipped_offloads_on_cpu)


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: float32 on cpu, the checkpoint's on cuda")


def live_policies() -> list[str]:
    """Policies a live cache can run (replay-only ones, like belady, need the future and refuse)."""
    names = []
    for name in sorted(POLICIES):
        try:
            make_policy(name, 2, 1)
        except (ValueError, TypeError):
            continue
        names.append(name)
    return names


def add_offload_args(p: argparse.ArgumentParser, shipped_offloads_on_cpu: bool = False) -> None:
    g = p.add_argument_group("expert offloading")
    shipped = ("the shipped model uses 4 (on the CPU too: its /stats and figures show the cache at work; "
               "--experts-per-layer 8 runs it faster)" if shipped_offloads_on_cpu else
               "on CUDA the shipped model uses 4")
    g.add_argument("--experts-per-layer", type=POSITIVE, metavar="K",
                   help="device slots per layer for experts; fewer than the model's experts turns offloading on "
                        "(default: every expert on the CPU, and a checkpoint's on CUDA; a quantized store on CUDA: "
                        f"K from the free device memory; {shipped})")
    g.add_argument("--store", choices=["ram", "mmap"],
                   help="host home of the experts: ram (loaded once, pinned on CUDA) or mmap (read in place)")
    g.add_argument("--prefetch", choices=["off", "next"], default="next",
                   help="load the next layer's guessed experts while this layer computes")
    g.add_argument("--device-memory", type=positive_float, metavar="GB",
                   help="device budget in GiB; the expert slots get what dense weights, KV cache and "
                        "activations leave (instead of --experts-per-layer)")
    g.add_argument("--cache-policy", choices=live_policies(), default="lru", help="expert eviction policy")
    g.add_argument("--expert-pool", choices=["global", "layer"],
                   help="expert slots shared by every layer, each keeping a quota of (slots // layers), sized from "
                        "the whole budget (global; the default with --cache-policy lru), or K per layer (layer; the "
                        "default with lfu and markov)")
    g.add_argument("--miss-policy", choices=(READ, *MISS_POLICIES),
                   help="where a missed expert runs: read in place from pinned host memory by the GPU's expert "
                        "kernels while cached experts come from device slots, with no host round trip in a step "
                        "(read; the default on CUDA for quantized stores, which it converts once at load into "
                        "pinned RAM), copied into a slot (copy), on the CPU from the host store (cpu), or per "
                        "layer whichever ends the layer sooner by a cost model measured at start-up (auto; the "
                        "CUDA default where read is unavailable; on the CPU device copy)")

    g.add_argument("--cpu-threads", type=POSITIVE, metavar="N",
                   help="threads for the experts run on the host while the GPU computes (CUDA; on the CPU "
                        "device -t sets them)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=NON_NEGATIVE, default=40, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("-s", "--seed", type=SEED, default=-1, help="sampling seed (default -1: random, printed)")


def resolve_seed(args, what: str) -> None:
    """-s -1: draw a random seed and print it on stderr, so that the `what` can be repeated."""
    if args.seed == -1:
        args.seed = secrets.randbits(63)
        print(f"seed: {args.seed} (-s {args.seed} repeats this {what})", file=sys.stderr)
