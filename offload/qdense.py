"""Stored forms of one quantized dense matrix, and what the model holds after loading it.

Two kinds, each stored as one packed uint8 tensor laid out by `dense_layout`:

    int4   HQQ codes, groups along the input dimension (the same parts as an expert matrix,
           named "w.q", "w.scale", ...), for attention projections and dense MLPs
    int8   "w.q" int8 [N, K] and "w.scale" fp32 [N]: W = q * scale, one scale per output row,
           for lm_head and the token embeddings (a row of the embedding is a row of W)

At load (`to_kernel`) several matrices with one input width can be stacked into one kernel
matrix (Mixtral's q, k and v as one projection). Where no fused kernel exists the matrices are
dequantized once, at load, into the compute dtype instead (`dequantized`).
"""

from __future__ import annotations

import functools

import torch

from offload.fused import FusedCodec, fused_unsupported
from offload.kernels import CHECK_TOLERANCE, Int8Mat, quantize_int8_rows, relative_error
from offload.packing import Layout, pack_into, views
from offload.quant import HQQCodec, QuantSpec, expert_layout, quantize_matrix

KINDS = ("int4", "int8")


def dense_layout(kind: str, shape: tuple[int, int], spec: QuantSpec | None) -> Layout:
    if kind == "int4":
        return expert_layout({"w": shape}, spec)
    if kind == "int8":
        return Layout.plan([("w.q", torch.int8, shape), ("w.scale", torch.float32, (shape[0],))])
    raise ValueError(f"unknown dense quantization kind {kind!r}: one of {KINDS}")


def quantize_dense(w: torch.Tensor, kind: str, spec: QuantSpec | None, device, method: str = "hqq") -> torch.Tensor:
    """W [N, K] -> its packed uint8 tensor."""
    layout = dense_layout(kind, tuple(w.shape), spec)
    if kind == "int4":
        parts = quantize_matrix(w, spec, "w", device, method)
    else:
        q, scale = quantize_int8_rows(w.to(device))
        parts = {"w.q": q.cpu(), "w.scale": scale.cpu()}
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    pack_into(buf, layout, parts)
    return buf


def int8_rows(packed: torch.Tensor, shape: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale fp32 [N]) of a packed int8 matrix, on device."""
    v = views(packed, dense_layout("int8", shape, None))
    return v["w.q"].to(device), v["w.scale"].to(device)


def fused_int8_unsupported(device: torch.device | str) -> str | None:
    """Why torch's int8 kernel cannot run here (None: it can); probed once per device with a tiny product."""
    return _int8_probe(torch.device(device))


@functools.cache
def _int8_probe(device: torch.device) -> str | None:
    """One small product through torch's int8 kernel, compared with the dequantized matrix's."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=gen)
    scale = (torch.rand(48, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    try:
        got = torch.ops.aten._weight_int8pack_mm(x.to(device), q.to(device), scale.to(device)).cpu()
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        return f"no int8 kernel on {device.type} ({str(e).splitlines()[0][:80]})"
    err = relative_error(got, x.float() @ (q.float() * scale.float()[:, None]).t())
    if not err < CHECK_TOLERANCE:
        return f"torch's int8 kernel on {device.type} computes a product {err:.2f} away (relative) from its matrix's"
    return None


def to_kernel(kind: str, packed: list[torch.Tensor], shapes: list[tuple[int, int]], spec: QuantSpec | None,
              device) -> tuple[object, str | None]:
    """Stack these matrices (same input width) into one fused-kernel matrix on device.

    Returns (Int4Mat | Int8Mat, None), or (None, why) when no fused kernel takes them here.
    """
    device = torch.device(device)
    if kind == "int8":
        why = fused_int8_unsupported(device)
        if why:
            return None, why
        rows = [int8_rows(p, s, device) for p, s in zip(packed, shapes, strict=True)]
        q = torch.cat([r[0] for r in rows]) if len(rows) > 1 else rows[0][0]
        scale = torch.cat([r[1] for r in rows]).to(torch.bfloat16)
        return Int8Mat(q.contiguous(), scale), None
    names = {f"m{i}": s for i, s in enumerate(shapes)}
    why = fused_unsupported(names, spec, device)
    if why:
        return None, why
    codec = FusedCodec(names, spec, device, stack={"w": tuple(names)})
    src = {}
    for i, p in enumerate(packed):
        for k, v in views(p.to(device), expert_layout({"w": shapes[i]}, spec)).items():
            src[f"m{i}" + k[1:]] = v
    buf = torch.empty(codec.slot_layout.nbytes, dtype=torch.uint8, device=device)
    out = views(buf, codec.slot_layout)
    codec.convert(src, out)
    return codec.decode(out)[0], None


def int8_dequantized(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = q * scale (one scale per row) in dtype."""
    return (q.float() * scale[:, None]).to(dtype)


def dequantized(kind: str, packed: torch.Tensor, shape: tuple[int, int], spec: QuantSpec | None, device,
                dtype: torch.dtype) -> torch.Tensor:
    """The matrix in dtype on device (the fallback where no fused kernel exists; load time only)."""
    if kind == "int8":
        return int8_dequantized(*int8_rows(packed, shape, device), dtype)
    codec = HQQCodec({"w": shape}, spec, device, dtype)
    return codec.decode(views(packed.to(device), dense_layout("int4", shape, spec)))[0]
