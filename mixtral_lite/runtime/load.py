"""The one way in: a plan (runtime/plan.py) becomes a loaded model, its experts where the plan put them.

    plan = plan_load(args)          # every front end: the flags, read and checked once
    model = load(plan)              # generate, perplexity: sizes and placement (sizing.py, as --dry-run
                                    # prints them), then model + ExpertProvider (+ OffloadEngine)
    session = open_session(plan)    # chat, server: the same model in a Session (KV reuse, batching)

`load_model(path, ...)` is the same load from Python without flags (README's example): every expert
resident for a Hugging Face checkpoint, all of them cached for a quantized store or a GGUF, or the
`experts=` factory given (offloading.make_factory).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..generation.session import Session
from ..model.build import build_model
from ..model.gguf import is_gguf
from ..model.qstore import is_quantized_store
from ..model.source import open_tokenizer
from ..model.transformer import Transformer
from . import offloading, sizing
from .dry_run import figures
from .plan import LoadPlan


def load(plan: LoadPlan, decided: tuple[sizing.Sizes, sizing.Placement] | None = None) -> Transformer:
    """The model the plan describes, its experts where the planner put them (`decided`: sizing.decide(plan),
    made here when not given); the planned figures, the ones --dry-run prints, are kept as `model.plan_figures`."""
    sz, placement = decided or sizing.decide(plan)
    model = load_model(plan.model_dir, device=plan.device, dtype=plan.dtype,
                       experts=offloading.build(plan, placement))
    model.plan_figures = figures(plan, sz, placement)
    model.cuda_graphs = plan.cuda_graphs  # read by model/static_step.decode_step
    return model


def open_session(plan: LoadPlan, decided: tuple[sizing.Sizes, sizing.Placement] | None = None) -> Session:
    """load(plan) in a Session over the plan's KV window and prefill chunk."""
    return Session(load(plan, decided), open_tokenizer(plan.model_dir), plan.window, chunk=plan.chunk)


def load_model(path, *, device="cpu", dtype: torch.dtype = torch.float32, experts=None,
               fused: bool = True) -> Transformer:
    """The model in a checkpoint folder (HF layout or a quantized store) on `device` in `dtype`.

    experts: optional factory (config, checkpoint, device, dtype) -> ExpertProvider that replaces
    loading every expert onto the device (offloading.make_factory gives one). A quantized store
    without one runs every expert from the offload engine, all cached (on CUDA: as many as fit).
    fused: quantized stores run on torch's fused kernels where they exist; False forces the
    dequantize-then-multiply path (the reference the fused one is measured against).
    """
    if experts is None and (is_quantized_store(Path(path)) or is_gguf(path)):
        experts = offloading.default_factory()
    return build_model(path, device=device, dtype=dtype, experts=experts, fused=fused)
