"""A GGUF file's dense matrices -> the model's projections, at load.

Each matrix runs where its type allows: Q4_0, Q4_1 and Q4_K on torch's int4 kernel (group 32, exact up
to the bf16 rounding of scale and zero; offload/ggml.py), any other type (F32/F16/BF16, Q8_0, Q5_K, Q6_K,
...) dequantized once into the compute dtype. Attention's q, k and v become one projection as in the
model (rows q, then k, then v); where their types differ (llama.cpp keeps Mixtral's k and v in Q8_0 beside
a Q4_0 q) the runs of each form are computed apart and concatenated. The token embeddings keep the file's
blocks and dequantize the rows a step looks up; a tied lm_head multiplies with the same blocks' int4 form.
"""

from __future__ import annotations

import torch
from torch import nn

from offload.ggml import GROUP, BlockType, dequantize, row_bytes
from offload.ggml_codec import GGMLCodec
from offload.kernels import QuantLinear, int4_unsupported
from offload.packing import views

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


class RowStack(nn.Module):
    """Projections whose outputs are concatenated: one matrix's rows computed in parts of different forms."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.forward(x) for p in self.parts], dim=-1)


class BlockEmbedding(nn.Module):
    """Token embeddings kept as the file's GGML rows; a lookup dequantizes only the rows it reads."""

    def __init__(self, raw: torch.Tensor, qtype: BlockType, dim: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("raw", raw, persistent=False)  # uint8 [V, row bytes], counted as device memory
        self.qtype, self.dim, self.dtype = qtype, dim, dtype

    @property
    def weight(self) -> torch.Tensor:  # device and dtype of what the model computes in (meta only)
        return torch.empty(0, device=self.raw.device, dtype=self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.raw[ids.reshape(-1)]
        out = torch.empty(rows.shape[0], self.dim, device=rows.device)
        return dequantize(self.qtype, rows, out).to(self.dtype).view(*ids.shape, self.dim)


def _plain(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def runs_int4(ckpt, parts: list[tuple[torch.Tensor, BlockType]], k: int, device) -> bool:
    """Whether these row blocks (one matrix's parts) go to the int4 kernel here."""
    n = sum(raw.shape[0] for raw, _ in parts)
    return ckpt.fused and all(t.int4 for _, t in parts) and int4_unsupported(n, k, GROUP, device) is None


def int4_linear(parts: list[tuple[torch.Tensor, BlockType]], k: int, device) -> QuantLinear:
    """Row blocks of int4-form types, stacked into one int4 kernel matrix on device."""
    shapes = {f"p{i}": (raw.shape[0], k) for i, (raw, _) in enumerate(parts)}
    types = {f"p{i}": t for i, (_, t) in enumerate(parts)}
    codec = GGMLCodec(shapes, [types], device, stack={"w": tuple(shapes)})
    buf = torch.empty(codec.slot_layout.nbytes, dtype=torch.uint8, device=device)
    slot = views(buf, codec.slot_layout)
    codec.convert_blocks({p: raw.to(device) for p, (raw, _) in zip(shapes, parts, strict=True)}, types, slot)
    return QuantLinear(codec.decode(slot)[0], sum(n for n, _ in shapes.values()))


def dense_linear(parts: list[tuple[torch.Tensor, BlockType]], k: int, device, dtype) -> nn.Linear:
    """Row blocks of any types, dequantized once into one dtype matrix on device."""
    w = torch.cat([dequantize(t, raw.to(device), torch.empty(raw.shape[0], k, device=device)) for raw, t in parts])
    return _plain(w.to(dtype))


def linear(ckpt, names: list[str], device, dtype, seen: dict[bool, set]) -> nn.Module:
    """One projection from these HF matrices (same input width), stacked by rows in this order.
    seen[form] collects the GGML types that went to the int4 kernel (True) or were dequantized (False)."""
    k = ckpt.shape(names[0])[1]
    parts = [ckpt.raw(n) for n in names]
    if runs_int4(ckpt, parts, k, device):
        runs = [(True, parts)]
    else:  # consecutive parts of one form: q on the int4 kernel beside dequantized k and v
        runs = []
        for p in parts:
            form = runs_int4(ckpt, [p], k, device)
            if runs and runs[-1][0] == form:
                runs[-1][1].append(p)
            else:
                runs.append((form, [p]))
    mods = []
    for form, ps in runs:
        mods.append(int4_linear(ps, k, device) if form else dense_linear(ps, k, device, dtype))
        seen[form] |= {t.name for _, t in ps}
    return mods[0] if len(mods) == 1 else RowStack(mods)


def install(model, ckpt, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Put every matrix of the GGUF into `model`; returns {kind: how it runs}."""
    seen: dict[bool, set] = {True: set(), False: set()}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        block.attn.qkv_proj = linear(ckpt, [f"{p}self_attn.{n}_proj.weight" for n in "qkv"], device, dtype, seen)
        block.attn.o_proj = linear(ckpt, [f"{p}self_attn.o_proj.weight"], device, dtype, seen)
        if block.mlp is not None:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                setattr(block.mlp, proj, linear(ckpt, [f"{p}mlp.{proj}.weight"], device, dtype, seen))
    raw, t = ckpt.raw(EMBED)
    model.embed = BlockEmbedding(raw.to(device), t, ckpt.config.hidden_size, dtype)
    model.lm_head = linear(ckpt, [HEAD], device, dtype, seen)  # a tied head reads token_embd's blocks
    notes = {"embeddings": f"{t.name} rows dequantized per lookup"}
    if seen[True]:
        notes["int4"] = f"fused int4 kernel ({'/'.join(sorted(seen[True]))})"
    if seen[False]:
        notes["dequantized"] = f"{'/'.join(sorted(seen[False]))} dequantized at load into {str(dtype)[6:]}"
    return notes


def device_bytes(ckpt, dtype: torch.dtype) -> int:
    """Device bytes of the dense weights once installed (int4: half a byte a weight + bf16 scale and zero
    per 32; dequantized: the dtype; embeddings: the file's rows)."""
    total = 0
    names = list(ckpt.names()) + ([HEAD] if ckpt.config.tie_word_embeddings else [])
    for name in names:
        shape = ckpt.shape(name)
        n = torch.Size(shape).numel()
        t = ckpt.raw(name)[1]
        if name == EMBED:
            total += shape[0] * row_bytes(t, shape[1])
        elif len(shape) == 2 and ".gate." not in name and ckpt.fused and t.int4:
            total += n // 2 + n // GROUP * 4
        else:
            total += n * dtype.itemsize
    return total
