"""GGML's quantized block types (the tensors of a GGUF file), decoded with torch on any device.

A GGML matrix W [N, K] is stored row by row; each row is K / B blocks of B weights, each block a few
bytes (ggml-common.h). Two things are read from them here:

    dequantize(qtype, raw, out)   raw uint8 [N, K / B * bytes] -> out float32 [N, K], ggml's own arithmetic
    int4_form(qtype, raw, codes, scale, zero)
                                  for the types that ARE 4-bit codes with an affine map per 32 weights:
                                  W = (q - 8) * scale + zero, q in [0, 16), exactly torch's int4 kernels'
                                  form (offload/kernels.py) with group 32:
        Q4_0  (q - 8) * d                     scale d,      zero 0
        Q4_1  d * q + m                       scale d,      zero 8 d + m
        Q4_K  d * sc_j * q - dmin * m_j       scale d sc_j, zero 8 d sc_j - dmin m_j   (sub-block j of 32)
    requantize_int4(w, codes, scale, zero)   any other type: round-to-nearest 4-bit codes, min-max per 32
                                  weights (lossy: the int4 kernels have no 5-, 6- or 8-bit form)

The kernels hold scale and zero in bf16, so an int4 form is exact up to one bf16 rounding of each
(relative 2^-9). Dequantizers follow gguf-py's `gguf.quants` step by step (the tests compare them with it);
their constants are made on the device by kernels (arange), never copied from the host, so a dequantizing
embedding lookup can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class BlockType:
    name: str
    id: int  # GGMLQuantizationType
    block: int  # weights per block
    nbytes: int  # bytes per block
    int4: bool  # has an exact int4 form (group 32)


TYPES = {t.id: t for t in (
    BlockType("F32", 0, 1, 4, False), BlockType("F16", 1, 1, 2, False), BlockType("BF16", 30, 1, 2, False),
    BlockType("Q4_0", 2, 32, 18, True), BlockType("Q4_1", 3, 32, 20, True), BlockType("Q5_0", 6, 32, 22, False),
    BlockType("Q5_1", 7, 32, 24, False), BlockType("Q8_0", 8, 32, 34, False),
    BlockType("Q2_K", 10, QK_K, 84, False), BlockType("Q3_K", 11, QK_K, 110, False),
    BlockType("Q4_K", 12, QK_K, 144, True), BlockType("Q5_K", 13, QK_K, 176, False),
    BlockType("Q6_K", 14, QK_K, 210, False),
)}
BY_NAME = {t.name: t for t in TYPES.values()}
OTHER_NAMES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
               21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
               29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}  # named in errors, not read
GROUP = 32  # the int4 kernels' group size for every GGML form


def row_bytes(t: BlockType, cols: int) -> int:
    return cols // t.block * t.nbytes


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of every block, as float32: b [..., block bytes] -> [...]."""
    return b[..., at : at + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs [..., 16] bytes -> [..., 32]: the low nibbles, then the high nibbles (Q4_0, Q4_1, Q5_0, Q5_1)."""
    return torch.stack([qs & 15, qs >> 4], dim=-2).flatten(-2)


def _k_scales(sc12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, float32 [..., 8] each."""
    d, m, md = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _blocks(t: BlockType, raw: torch.Tensor) -> torch.Tensor:
    """raw uint8 [N, row bytes] -> [N, blocks per row, block bytes]."""
    return raw.reshape(raw.shape[0], -1, t.nbytes)


def _deq_q4_0(b):
    return (_nibbles(b[..., 2:]).float() - 8) * _f16(b, 0)[..., None]


def _deq_q4_1(b):
    return _nibbles(b[..., 4:]).float() * _f16(b, 0)[..., None] + _f16(b, 2)[..., None]


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes of high bits -> [..., 32] bit j of the little-endian word (weight j's fifth bit)."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.uint8)
    return ((qh[..., :, None] >> shifts) & 1).flatten(-2)


def _deq_q5_0(b):
    q = _nibbles(b[..., 6:]) | (_q5_high(b[..., 2:6]) << 4)
    return (q.float() - 16) * _f16(b, 0)[..., None]


def _deq_q5_1(b):
    q = _nibbles(b[..., 8:]) | (_q5_high(b[..., 4:8]) << 4)
    return q.float() * _f16(b, 0)[..., None] + _f16(b, 2)[..., None]


def _deq_q8_0(b):
    return b[..., 2:].contiguous().view(torch.int8).float() * _f16(b, 0)[..., None]


def _deq_q2_k(b):
    scales, qs = b[..., :16], b[..., 16:80]
    d, dmin = _f16(b, 80)[..., None], _f16(b, 82)[..., None]
    dl, ml = d * (scales & 15).float(), dmin * (scales >> 4).float()  # [..., 16]
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8)
    q = ((qs.unflatten(-1, (2, 1, 32)) >> shifts[:, None]) & 3).reshape(*b.shape[:-1], 16, 16).float()
    return (dl[..., None] * q - ml[..., None]).flatten(-2)


def _deq_q3_k(b):
    hmask, qs, sc12 = b[..., :32], b[..., 32:96], b[..., 96:108]
    d = _f16(b, 108)[..., None]
    lo = torch.stack([sc12[..., :8] & 15, sc12[..., :8] >> 4], dim=-2).flatten(-2)  # [..., 16]
    shifts4 = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8)
    hi = ((sc12[..., 8:12].unsqueeze(-2) >> shifts4[:, None]) & 3).flatten(-2)
    sc = ((lo | (hi << 4)).to(torch.int8) - 32).float()
    ql = ((qs.unflatten(-1, (2, 1, 32)) >> shifts4[:, None]) & 3).reshape(*b.shape[:-1], 16, 16)
    shifts8 = torch.arange(8, device=b.device, dtype=torch.uint8)
    qh = ((hmask.unflatten(-1, (1, 1, 32)) >> shifts8[:, None]) & 1).reshape(*b.shape[:-1], 16, 16) ^ 1
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)
    return ((d * sc)[..., None] * q.float()).flatten(-2)


def _deq_q4_k(b):
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    sc, mn = _k_scales(b[..., 4:16])
    q = torch.stack([b[..., 16:].unflatten(-1, (4, 32)) & 15, b[..., 16:].unflatten(-1, (4, 32)) >> 4], -2)
    q = q.reshape(*b.shape[:-1], 8, 32).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).flatten(-2)


def _deq_q5_k(b):
    d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
    sc, mn = _k_scales(b[..., 4:16])
    qh, qs = b[..., 16:48], b[..., 48:]
    ql = torch.stack([qs.unflatten(-1, (4, 32)) & 15, qs.unflatten(-1, (4, 32)) >> 4], -2).reshape(
        *b.shape[:-1], 8, 32)
    shifts8 = torch.arange(8, device=b.device, dtype=torch.uint8)
    hi = ((qh.unsqueeze(-2) >> shifts8[:, None]) & 1)  # [..., 8, 32]
    q = (ql | (hi << 4)).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).flatten(-2)


def _deq_q6_k(b):
    ql, qh, sc = b[..., :128], b[..., 128:192], b[..., 192:208].contiguous().view(torch.int8).float()
    d = _f16(b, 208)[..., None]
    lo = torch.stack([ql.unflatten(-1, (2, 64)) & 15, ql.unflatten(-1, (2, 64)) >> 4], -2)  # [..., 2, 2, 64]
    lo = lo.reshape(*b.shape[:-1], 8, 32)
    shifts4 = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8)
    hi = ((qh.unflatten(-1, (2, 1, 32)) >> shifts4[:, None]) & 3).reshape(*b.shape[:-1], 8, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).float().reshape(*b.shape[:-1], 16, 16)
    return ((d * sc)[..., None] * q).flatten(-2)


_DEQUANT = {"Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1, "Q5_0": _deq_q5_0, "Q5_1": _deq_q5_1, "Q8_0": _deq_q8_0,
            "Q2_K": _deq_q2_k, "Q3_K": _deq_q3_k, "Q4_K": _deq_q4_k, "Q5_K": _deq_q5_k, "Q6_K": _deq_q6_k}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def dequantize(t: BlockType, raw: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """raw uint8 [N, row bytes] -> out float32 [N, K] (returned), on raw's device."""
    if t.name in _PLAIN:
        return out.copy_(raw.contiguous().view(_PLAIN[t.name]).view(out.shape))
    return out.copy_(_DEQUANT[t.name](_blocks(t, raw)).view(out.shape))


def _split_nibbles(qs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Bytes qs -> their low nibbles into lo, their high nibbles into hi (same shapes, uint8). Where the last
    dimension allows, 2 or 8 bytes are handled as one integer (mask 0x0F0F...): 2-8x fewer elements."""
    for dtype, mask in ((torch.int64, 0x0F0F0F0F0F0F0F0F), (torch.int16, 0x0F0F)):
        size = dtype.itemsize
        if all(t.shape[-1] % size == 0 and t.stride(-1) == 1 and t.storage_offset() % size == 0
               and all(st % size == 0 for st in t.stride()[:-1]) and t.data_ptr() % size == 0 for t in (qs, lo, hi)):
            q, lo, hi = qs.view(dtype), lo.view(dtype), hi.view(dtype)
            torch.bitwise_and(q, mask, out=lo)
            torch.bitwise_and(q >> 4, mask, out=hi)  # the bits shifted in from the next byte are masked off
            return
    torch.bitwise_and(qs, 15, out=lo)
    torch.bitwise_right_shift(qs, 4, out=hi)


def int4_form(t: BlockType, raw: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              zero: torch.Tensor) -> None:
    """raw uint8 [N, row bytes] of an int4-form type -> codes uint8 [N, K] in [0, 16), scale and zero
    float32 [N, K / 32] with W = (q - 8) * scale + zero per group of 32 (written into the given tensors)."""
    b = _blocks(t, raw)
    n = raw.shape[0]
    if t.name in ("Q4_0", "Q4_1"):
        c = codes.view(n, -1, 2, 16)
        _split_nibbles(b[..., 4:] if t.name == "Q4_1" else b[..., 2:], c[:, :, 0], c[:, :, 1])
        d = _f16(b, 0)
        scale.copy_(d)
        zero.copy_(8 * d + _f16(b, 2)) if t.name == "Q4_1" else zero.zero_()
    elif t.name == "Q4_K":
        c = codes.view(n, -1, 4, 2, 32)
        _split_nibbles(b[..., 16:].unflatten(-1, (4, 32)), c[:, :, :, 0], c[:, :, :, 1])
        sc, mn = _k_scales(b[..., 4:16])
        s = _f16(b, 0)[..., None] * sc  # [N, blocks, 8]
        scale.view(n, -1, 8).copy_(s)
        zero.view(n, -1, 8).copy_(8 * s - _f16(b, 2)[..., None] * mn)
    else:
        raise ValueError(f"{t.name} has no int4 form")


def requantize_int4(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """w float32 [N, K] -> 4-bit codes, round to nearest, min-max per 32 weights, against the bf16-rounded
    scale and zero the kernels will hold (written into codes uint8 [N, K], scale and zero float32 [N, K/32]).
    w is overwritten (the codes are formed in place: no temporary of its size)."""
    g = w.view(w.shape[0], -1, GROUP)
    lo, hi = torch.aminmax(g, dim=-1)
    s = ((hi - lo) / 15).to(torch.bfloat16).float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: any scale, the zero carries it
    z = (lo + 8 * s).to(torch.bfloat16).float()
    inv = 1 / s
    g.mul_(inv[..., None]).add_((8 - z * inv)[..., None]).round_().clamp_(0, 15)  # (w - z) / s + 8
    codes.view_as(g).copy_(g)
    scale.copy_(s)
    zero.copy_(z)


def type_name(type_id: int) -> str:
    t = TYPES.get(type_id)
    return t.name if t else OTHER_NAMES.get(type_id, f"GGML type {type_id}")
