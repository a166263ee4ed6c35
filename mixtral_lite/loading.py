"""The model flags the server and the chat share with `generate`, and turning them into a Session.

The flags mirror generate.build_parser's model and offload options (same names, same defaults);
generate's own prompt/output flags stay there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from . import default_model_path, offloading
from .config import DTYPES, ModelConfig
from .generate import SHIPPED_EXPERTS_PER_LAYER, pick_device, pick_dtype
from .model import load_model
from .session import Session
from .tokenizer import Tokenizer


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", type=Path, help="checkpoint folder (default: the shipped Austen model)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="KV window when the model has no sliding_window (Mixtral-8x7B has none)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("-t", "--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, the checkpoint's on cuda")
    if offloading is not None:
        offloading.add_args(p)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("-s", "--seed", type=int, default=0)


def prepare(args) -> Callable[[], Session]:
    """Check the flags now (one-line errors); return what loads the model into a Session."""
    if args.model is None:
        args.model = default_model_path()
        if offloading is not None and getattr(args, "experts_per_layer", None) is None:
            args.experts_per_layer = SHIPPED_EXPERTS_PER_LAYER
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: -m/--model: {args.model} is not a model folder (no config.json)")
    for flag, value in (("-c/--ctx-size", args.ctx_size), ("-b/--batch-size", args.batch_size),
                        ("-t/--threads", args.threads or 1)):
        if value < 1:
            raise SystemExit(f"error: {flag} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    config = ModelConfig.from_dir(args.model)
    dtype = pick_dtype(args.dtype, config, device)  # generate's rule: fp32 on the CPU, the checkpoint's on CUDA
    factory = offloading.build(args, config, device, dtype) if offloading else None

    def load() -> Session:
        model = load_model(args.model, device=device, dtype=dtype, experts=factory)
        window = model.config.sliding_window or args.ctx_size
        return Session(model, Tokenizer.from_dir(args.model), window, chunk=args.batch_size)
    return load
