"""Turning the model flags the server and the chat share with `generate` (mixtral_lite/cli.py's
add_model_args and add_sampling_args: one definition) into a Session."""

from __future__ import annotations

from collections.abc import Callable

from .. import default_model_path
from ..cli.generate import SHIPPED_EXPERTS_PER_LAYER, pick_device, pick_dtype, set_threads
from ..generation.session import Session
from ..model.config import ModelConfig
from ..model.tokenizer import Tokenizer
from ..model.transformer import load_model
from . import offloading


def prepare(args) -> Callable[[], Session]:
    """Check the flags now (one-line errors); return what loads the model into a Session."""
    if args.model is None:
        args.model = default_model_path()
        if offloading is not None and getattr(args, "experts_per_layer", None) is None:
            args.experts_per_layer = SHIPPED_EXPERTS_PER_LAYER
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: -m/--model: {args.model} is not a model folder (no config.json)")
    set_threads(args)  # generate's rule: the physical cores, fewer when others are busy, printed
    device = pick_device(args.device)
    config = ModelConfig.from_dir(args.model)
    dtype = pick_dtype(args.dtype, config, device)  # generate's rule: fp32 on the CPU, the checkpoint's on CUDA
    factory = offloading.build(args, config, device, dtype) if offloading else None

    def load() -> Session:
        model = load_model(args.model, device=device, dtype=dtype, experts=factory)
        window = model.config.sliding_window or args.ctx_size
        return Session(model, Tokenizer.from_dir(args.model), window, chunk=args.batch_size)
    return load
