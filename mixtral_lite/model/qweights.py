"""A quantized store's dense weights -> the model's projections, in fused-kernel layouts, at load.

Attention's q, k and v become one int4 (or int8) kernel matrix, like the fp qkv_proj; o_proj and a
dense Mistral MLP's gate/up/down one each; lm_head an int8 matrix; the token embeddings int8 rows
(one scale each) that a tied lm_head multiplies with too. Where this device has no fused kernel
for a kind, those matrices are dequantized once here into the compute dtype, and the note says so.
"""

from __future__ import annotations

import torch
from torch import nn

from offload.kernels import Int8Mat, QuantEmbedding, QuantLinear
from offload.qdense import dequantized, fused_int8_unsupported, int8_dequantized, int8_rows, to_kernel

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _plain(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def _linear(store, names: list[str], device, dtype, notes: dict[str, str]) -> nn.Module:
    """One projection from these stacked matrices: fused kernel, or dequantized once (fallback)."""
    kind = store.quantized[names[0]]
    packed = [store.packed(n) for n in names]
    shapes = [store.shape(n) for n in names]
    mat, why = to_kernel(kind, [p for p, _ in packed], shapes, packed[0][1], device) if store.fused else (
        None, "asked for")
    if mat is not None:
        notes.setdefault(kind, f"fused {kind} kernel")
        return QuantLinear(mat, sum(s[0] for s in shapes))
    notes[kind] = f"dequantized at load ({why})"
    return _plain(torch.cat([dequantized(kind, p, s, spec, device, dtype)
                             for (p, spec), s in zip(packed, shapes, strict=True)]))


def install(model, store, device, dtype) -> dict[str, str]:
    """Put every quantized dense tensor of `store` into `model`; returns {kind: how it runs}."""
    q, notes = store.quantized, {}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv = [f"{p}self_attn.{n}_proj.weight" for n in "qkv"]
        if qkv[0] in q:
            block.attn.qkv_proj = _linear(store, qkv, device, dtype, notes)
        if f"{p}self_attn.o_proj.weight" in q:
            block.attn.o_proj = _linear(store, [f"{p}self_attn.o_proj.weight"], device, dtype, notes)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if f"{p}mlp.{proj}.weight" in q:
                setattr(block.mlp, proj, _linear(store, [f"{p}mlp.{proj}.weight"], device, dtype, notes))
    if EMBED in q:
        rows, scale = int8_rows(store.packed(EMBED)[0], store.shape(EMBED), device)
        model.embed = QuantEmbedding(rows, scale, dtype)
        if model.config.tie_word_embeddings:
            model.lm_head = _tied_head(rows, scale, device, dtype, notes, store.fused)
    if HEAD in q:
        model.lm_head = _linear(store, [HEAD], device, dtype, notes)
    return notes


def _tied_head(rows: torch.Tensor, scale: torch.Tensor, device, dtype, notes: dict[str, str],
               fused: bool) -> nn.Module:
    """A tied lm_head over the int8 embedding rows (no second copy) where the int8 kernel exists."""
    why = fused_int8_unsupported(device) if fused else "asked for"
    if why is None:
        notes.setdefault("int8", "fused int8 kernel")
        return QuantLinear(Int8Mat(rows, scale.to(torch.bfloat16)), rows.shape[0])
    notes["int8"] = f"dequantized at load ({why})"
    return _plain(int8_dequantized(rows, scale, dtype))
