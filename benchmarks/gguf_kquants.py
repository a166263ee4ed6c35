"""Quantize float rows into llama.cpp's K-quant blocks (Q4_K, Q5_K, Q6_K), in numpy, for test files.

gguf-py quantizes only the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); these write the K types in
ggml-common.h's byte layout with a plain min-max (Q4_K, Q5_K) or abs-max (Q6_K) choice of scales, not
llama.cpp's search, so their error is somewhat larger than llama-quantize's. gguf-py's dequantizers read
them back (the tests check the round trip).

    quantize(rows float32 [..., K], "Q4_K") -> uint8 [..., K / 256 * block bytes]
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    """[n] values -> [n, 2] bytes of fp16."""
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block [n, 8] -> the 12 bytes Q4_K/Q5_K store (gguf get_scale_min's inverse)."""
    lo_s, hi_s, lo_m, hi_m = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    b0 = (lo_s & 63) | ((hi_s >> 4) << 6)
    b1 = (lo_m & 63) | ((hi_m >> 4) << 6)
    b2 = (hi_s & 15) | ((hi_m & 15) << 4)
    return np.concatenate([b0, b1, b2], axis=1).astype(np.uint8)


def _affine(x: np.ndarray, levels: int):
    """Super-blocks x [n, 8, 32] -> (d, dmin [n], sc, mn [n, 8] six-bit, q [n, 8, 32]) with x ~ d sc q - dmin mn."""
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    scale, mins = (hi - lo) / levels, -lo
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1) / 63).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.round(scale / d[:, None]), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin[:, None] > 0, np.round(mins / dmin[:, None]), 0).clip(0, 63).astype(np.uint8)
        step = d[:, None] * sc
        q = np.where(step[..., None] > 0, np.round((x + (dmin[:, None] * mn)[..., None]) / step[..., None]), 0)
    return d, dmin, sc, mn, q.clip(0, levels).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [n, 8, 32] (< 16) -> 128 bytes: chunk c byte l = q[2c, l] | q[2c + 1, l] << 4."""
    q = q.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _affine(x.reshape(-1, 8, 32), 15)
    return np.concatenate([_f16(d), _f16(dmin), _pack_scales(sc, mn), _nibbles(q)], axis=1)


def q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _affine(x.reshape(-1, 8, 32), 31)
    high = (q >> 4).astype(np.uint8)  # [n, 8, 32]: bit j of byte l is sub-block j's fifth bit at l
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8)
    return np.concatenate([_f16(d), _f16(dmin), _pack_scales(sc, mn), qh, _nibbles(q & 15)], axis=1)


def q6_k(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, 16, 16)
    amax = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    scale = amax / -32  # signed, as ggml: the largest magnitude maps to code -32
    d = (np.abs(scale).max(-1) / 127).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.round(scale / d[:, None]), 0).clip(-128, 127).astype(np.int8)
        step = (d[:, None] * sc)[..., None]
        q = np.where(step != 0, np.round(x / step), 0).clip(-32, 31).astype(np.int16) + 32
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)  # [n, half, quarter, 32]: weight 128 h + 32 s + l
    ql = (q[:, :, :2] & 15) | ((q[:, :, 2:] & 15) << 4)  # byte 64 h + 32 s + l: quarters s and s + 2
    qh = np.bitwise_or.reduce((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64).astype(np.uint8),
                           sc.view(np.uint8), _f16(d)], axis=1)


QUANTIZERS = {"Q4_K": (q4_k, 144), "Q5_K": (q5_k, 176), "Q6_K": (q6_k, 210)}


def quantize(rows: np.ndarray, qtype: str) -> np.ndarray:
    """rows float [..., K] (K a multiple of 256) -> uint8 [..., K / 256 * block bytes]."""
    fn, nbytes = QUANTIZERS[qtype]
    *lead, k = rows.shape
    if k % QK_K:
        raise ValueError(f"rows of {k} weights: {qtype} needs a multiple of {QK_K}")
    blocks = fn(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, QK_K))
    return blocks.reshape(*lead, k // QK_K * nbytes)
