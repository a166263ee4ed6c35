"""What a quantized store holds and weighs, without reading one: the quantizer's settings and its rule
for the dense tensors (tools/store_converter.py writes by it), and the device bytes of those tensors once
model/qweights.py has loaded them. `--dry-run --bits N` plans a store from config.json with these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.fused import fused_unsupported
from offload.qdense import fused_int8_unsupported
from offload.quant import QuantSpec

from . import quant_defaults as qd
from .checkpoint import expected_shapes
from .config import ModelConfig


@dataclass(frozen=True)
class DenseSettings:
    """How the non-expert matrices are stored: bits per role (16 = source dtype, unchanged)."""

    attn: QuantSpec | None = None  # int4 (axis 1) or None
    attn_int8: bool = False
    head_bits: int = 16
    embed_bits: int = 16

    def to_dict(self) -> dict:
        return {"attention": "int8" if self.attn_int8 else (self.attn.to_dict() if self.attn else 16),
                "lm_head": self.head_bits, "embeddings": self.embed_bits}


def default_dense() -> DenseSettings:
    """tools/quantize_experts.py's defaults: int4 g64 attention, int8 lm_head and embeddings."""
    return DenseSettings(QuantSpec(qd.ATTN_BITS, qd.ATTN_GROUP, 1, 16), False, qd.HEAD_BITS, qd.EMBED_BITS)


def default_spec(bits: int, group_size: int | None = None) -> QuantSpec:
    """The experts' settings tools/quantize_experts.py --bits N [--group-size G] writes."""
    group = qd.DEFAULT_GROUP[bits] if group_size is None else group_size
    return QuantSpec(bits, group, qd.EXPERT_AXIS, qd.EXPERT_META_BITS)


def dense_kind(name: str, spec: QuantSpec, dense: DenseSettings) -> tuple[str, QuantSpec | None] | None:
    """(kind, int4 settings) the quantizer stores a dense tensor as, or None when it copies it unchanged."""
    if ".experts." in name:
        return None
    if ".self_attn." in name:
        return ("int8", None) if dense.attn_int8 else ("int4", dense.attn) if dense.attn else None
    if ".mlp." in name:  # a dense Mistral's MLP takes the experts' settings
        return ("int4", spec) if spec.bits <= 4 else ("int8", None)
    if (name, 8) in (("lm_head.weight", dense.head_bits), ("model.embed_tokens.weight", dense.embed_bits)):
        return "int8", None
    return None


def dense_device_bytes(cfg: ModelConfig, kinds: dict[str, tuple[str, QuantSpec | None]], dtype: torch.dtype,
                       device: torch.device | str, fused: bool = True) -> int:
    """Device bytes of a store's dense weights once loaded (model/qweights.py): plain ones in dtype; int4 in the
    fused kernel's layout (half a byte a weight + bf16 scale and zero per group); int8 a byte a weight + its row
    scale (fp32 for the embedding rows, bf16 for a kernel matrix, both for a tied lm_head); a kind without a
    kernel on `device` dequantized at load into dtype."""
    total = 0
    for name, shape in expected_shapes(cfg).items():
        if ".experts." in name:
            continue
        n = torch.Size(shape).numel()
        kind, spec = kinds.get(name, (None, None))
        if kind is not None and not fused:
            kind = None
        if kind == "int4" and fused_unsupported({"w": shape}, spec, device) is None:
            total += n // 2 + n // spec.group_size * 4
        elif kind == "int8" and name == "model.embed_tokens.weight":
            total += n + shape[0] * 4  # int8 rows + fp32 scale, looked up by QuantEmbedding on every device
            if cfg.tie_word_embeddings:  # the tied lm_head: a bf16 scale over the same rows, or dequantized
                why = fused_int8_unsupported(device)
                total += shape[0] * 2 if why is None else n * dtype.itemsize
        elif kind == "int8" and fused_int8_unsupported(device) is None:
            total += n + shape[0] * 2
        else:
            total += n * dtype.itemsize
    return total
