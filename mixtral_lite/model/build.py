"""A Transformer from a checkpoint folder: HF tensor names into our modules, the experts from a factory.

    build_model(path, device=, dtype=, experts=factory)
      Checkpoint (HF safetensors), quantized store (model/qstore.py) or GGUF file (model/gguf) -> tensors,
      on the meta device first -> dense weights in place (q, k, v stacked into one projection; quantized
      ones via model/qweights.py, a GGUF's via model/gguf/dense.py)
      -> model.experts = factory(config, checkpoint, device, dtype)   (an ExpertProvider, model/experts.py)

The model never chooses where its experts live: without a factory a Hugging Face checkpoint keeps
every expert on the device (resident_experts); the runtime (mixtral_lite/runtime/load.py) passes the
factory that offloads them, and the one a quantized store needs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import qstore, qweights
from .checkpoint import Checkpoint, check_finite, expert_name
from .config import ModelConfig
from .experts import ResidentExperts
from .gguf import is_gguf
from .gguf.checkpoint import GGUFCheckpoint
from .transformer import Attention, Transformer


def _module_name(hf_name: str) -> str:
    """HF tensor name -> this module's parameter name."""
    name = hf_name.removeprefix("model.")
    for hf, ours in ((".input_layernorm.", ".input_norm."),
                     (".post_attention_layernorm.", ".post_attention_norm."),
                     (".self_attn.", ".attn."), (".block_sparse_moe.gate.", ".moe.router."),
                     ("embed_tokens.", "embed.")):
        name = name.replace(hf, ours)
    return name


QKV = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight")


def _load_qkv_rows(model: Transformer, name: str, weight: torch.Tensor) -> None:
    """Copy q_proj, k_proj or v_proj into its rows of the attention's fused qkv_proj."""
    attn: Attention = model.get_submodule(name.rsplit(".", 2)[0])
    fused = attn.qkv_proj.weight
    if fused.is_meta:  # first of the three: allocate the fused weight where the model lives
        fused = nn.Parameter(torch.empty(fused.shape, device=weight.device, dtype=weight.dtype),
                             requires_grad=False)
        attn.qkv_proj.weight = fused
    fused[attn.qkv_rows()[name.rsplit(".", 2)[1][0]]].copy_(weight)


def resident_experts(cfg: ModelConfig, ckpt, device, dtype):
    """Every expert on the device, stacked per layer (w1 and w3 in one matrix); read one matrix at a time."""
    d, i_ = cfg.hidden_size, cfg.intermediate_size
    w13, w2 = [], []
    for layer in range(cfg.num_layers):
        up = torch.empty((cfg.num_experts, 2 * i_, d), device=device, dtype=dtype)
        down = torch.empty((cfg.num_experts, d, i_), device=device, dtype=dtype)
        for e in range(cfg.num_experts):
            up[e, :i_].copy_(ckpt.get(expert_name(layer, e, "w1"), dtype, device))
            up[e, i_:].copy_(ckpt.get(expert_name(layer, e, "w3"), dtype, device))
            down[e].copy_(ckpt.get(expert_name(layer, e, "w2"), dtype, device))
        w13.append(up)
        w2.append(down)
    return ResidentExperts(w13, w2)


class _SkipInit(TorchFunctionMode):
    """torch.nn.init's random init becomes a no-op: the model is built on the meta device, where it is
    pointless, and Embedding's normal_ there imports torch._dynamo (1.3 s of a 3 s start-up)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build_model(path, *, device="cpu", dtype: torch.dtype = torch.float32, experts=None,
                fused: bool = True) -> Transformer:
    """Build the model from a checkpoint folder (HF layout or a quantized store).

    experts: factory (config, checkpoint, device, dtype) -> ExpertProvider; None keeps every expert
    of a Hugging Face checkpoint on the device. A quantized store's experts have no resident path
    here: they need a factory (runtime/load.py's load_model passes the offload engine's).
    fused: quantized stores run on torch's fused kernels where they exist; False forces the
    dequantize-then-multiply path (the reference the fused one is measured against).
    """
    ckpt = open_checkpoint(path, fused, device)
    cfg = ckpt.config
    if cfg.is_moe and experts is None and not isinstance(ckpt, Checkpoint):
        raise ValueError(f"{ckpt.path}: a quantized store's experts run from the offload engine: pass "
                         "experts= (mixtral_lite.runtime.load.load_model passes it)")
    with torch.device("meta"), _SkipInit():
        model = Transformer(cfg)
    params = dict(model.named_parameters())
    quantized = getattr(ckpt, "quantized", {})
    for name in ckpt.names():
        if ".experts." in name or name in quantized:
            continue
        ours = _module_name(name)
        if ours.endswith(QKV):
            _load_qkv_rows(model, ours, ckpt.get(name, dtype, device))
            continue
        if ours not in params:
            raise KeyError(f"{ckpt.path}: tensor {name!r} has no place in the model")
        module, _, attr = ours.rpartition(".")
        setattr(model.get_submodule(module), attr,
                nn.Parameter(ckpt.get(name, dtype, device), requires_grad=False))
    if hasattr(ckpt, "install"):  # a GGUF (model/gguf/dense.py): its matrices in the kernels' layouts
        model.kernel_notes = ckpt.install(model, device, dtype)
    else:
        model.kernel_notes = qweights.install(model, ckpt, device, dtype) if quantized else {}
    if cfg.tie_word_embeddings and isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.is_meta:
        model.lm_head.weight = model.embed.weight
    if cfg.is_moe:
        model.experts = (experts or resident_experts)(cfg, ckpt, device, dtype)
        if getattr(ckpt, "codec_note", None):
            model.kernel_notes["experts"] = ckpt.codec_note
    check_loaded(model)
    if not isinstance(ckpt, Checkpoint):  # Checkpoint.get checks what it reads; other stores are checked here
        for name, p in model.named_parameters():
            check_finite(p, ckpt.path, name)
    return model.eval()


def open_checkpoint(path, fused: bool = True, device="cpu"):
    """A Checkpoint for HF folders, the quantized store's reader for quantize_experts output, a GGUF file's
    reader (model/gguf; `device` decides where its experts come from: see GGUFCheckpoint)."""
    if is_gguf(path):
        return GGUFCheckpoint(path, fused, device)
    if qstore.is_quantized_store(Path(path)):
        return qstore.open_store(Path(path), fused)
    return Checkpoint(path)


def check_loaded(model: Transformer) -> None:
    """Every parameter came from the checkpoint (none left on the meta device)."""
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters not found in the checkpoint: {left[:3]}")
