"""Quantized matrices in the layouts torch's fused kernels read, and the products with them.

Int4, groups of g along the input dimension (torch's `_weight_int4pack_mm_for_cpu` on the
CPU, `_weight_int4pack_mm` on CUDA, Ampere or newer). For W [N, K] they compute x W^T with

    W[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]        q in [0, 16)

HQQ's W = (q - z) * s is the same matrix with scale = s and zero = (8 - z) * s, so 2-, 3- and
4-bit HQQ codes (axis=1 groups) run on it unchanged. `scales_and_zeros` is bf16 [K/g, N, 2].

Packed codes:
- CPU: uint8 [N * K / 2]. For N % 64 == 0 the layout is blocks of 64 output rows; inside block b,
  for each k, 32 bytes, byte j = q[64b + j, k] | q[64b + 32 + j, k] << 4 (written here with a
  few vector ops, ~6x faster than torch's converter); other N go through torch's converter.
- CUDA: torch's tiled int32 layout from `_convert_weight_to_int4pack` (input: uint8 [N, K/2],
  byte = q[n, 2i] << 4 | q[n, 2i + 1]), made on the device.

Int8, one scale per output row (torch's `_weight_int8pack_mm`): W[n, k] = q[n, k] * scale[n].

On the CPU both kernels are fast only with bf16 activations (fp32 ones take a slow reference
path): products take x in bf16 and return bf16; the caller casts once per block, not per op.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the int4 kernels accept
ACT = torch.bfloat16  # activation dtype of the fused kernels

Spec = tuple[str, torch.dtype, tuple]


def _cuda_tiles(k: int) -> int:
    """inner_k_tiles of torch's CUDA int4 layout: the largest of 8, 4, 2 with K % (16 * tiles) == 0."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def int4_unsupported(n: int, k: int, group: int, device: torch.device | str) -> str | None:
    """Why an [n, k] matrix in groups of `group` cannot use the fused int4 kernel here (None: it can)."""
    device = torch.device(device)
    if group not in INT4_GROUPS:
        return f"group size {group} (the int4 kernel takes {INT4_GROUPS})"
    if k % group or k % 32:
        return f"input width {k} is not a multiple of the group size {group} and of 32"
    if device.type == "cpu":
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return f"torch {torch.__version__} has no CPU int4 kernel"
        return None if n % 16 == 0 else f"output width {n} is not a multiple of 16"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA int4 kernel needs compute capability 8.0 (Ampere) or newer"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            return f"torch {torch.__version__} has no CUDA int4 kernel"
        return None if n % 8 == 0 else f"output width {n} is not a multiple of 8"
    return f"no int4 kernel on {device.type}"


def int4_specs(prefix: str, n: int, k: int, group: int, device: torch.device | str) -> list[Spec]:
    """(name, dtype, shape) of one [n, k] int4 matrix in the kernel's layout: codes, then scales_and_zeros."""
    if torch.device(device).type == "cuda":
        t = _cuda_tiles(k)
        codes = (f"{prefix}.w", torch.int32, (n // 8, k // (t * 16), 32, t // 2))
    else:
        codes = (f"{prefix}.w", torch.uint8, (n, k // 2))
    return [codes, (f"{prefix}.sz", ACT, (k // group, n, 2))]


def pack_int4_codes(codes: torch.Tensor, out: torch.Tensor) -> None:
    """codes uint8 [N, K] in [0, 16) -> `out`, the kernel layout on out's device (see the module docstring)."""
    n, k = codes.shape
    if out.device.type == "cuda":
        pairs = (codes[:, ::2] << 4) | codes[:, 1::2]
        out.copy_(torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), out.shape[-1] * 2))
    elif n % 64 == 0:
        v = codes.view(n // 64, 2, 32, k)
        torch.bitwise_or(v[:, 0], v[:, 1] << 4, out=out.view(n // 64, k, 32).transpose(1, 2))
    else:
        out.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2))


def unpack_int4_codes(packed: torch.Tensor, codes: torch.Tensor) -> None:
    """The CPU layout's packed codes (N % 64 == 0) -> codes uint8 [N, K] in [0, 16), on packed's device:
    the inverse of pack_int4_codes on the CPU."""
    n, k = codes.shape
    if n % 64:
        raise ValueError(f"output width {n}: the CPU int4 layout is unpacked here only for multiples of 64")
    blocks = packed.view(n // 64, k, 32).transpose(1, 2)
    v = codes.view(n // 64, 2, 32, k)
    torch.bitwise_and(blocks, 15, out=v[:, 0])
    torch.bitwise_right_shift(blocks, 4, out=v[:, 1])


@functools.cache
def cpu_layout_is_ours() -> bool:
    """Whether this torch's CPU int4 converter lays codes out as pack_int4_codes does (stores written in
    the CPU kernel's layout depend on it)."""
    codes = torch.arange(64 * 64, dtype=torch.int32).view(64, 64).remainder(16).flip(0)
    ours = torch.empty(64 * 32, dtype=torch.uint8)
    pack_int4_codes(codes.to(torch.uint8), ours)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    return torch.equal(ours, theirs.reshape(-1).view(torch.uint8))


def pack_int4_meta(scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> None:
    """HQQ's scale s and zero z, fp32 [N, K/g] -> scales_and_zeros [K/g, N, 2]: (s, (8 - z) * s)."""
    out[..., 0].copy_(scale.t())
    out[..., 1].copy_(((8.0 - zero) * scale).t())


@dataclass(frozen=True, slots=True)
class Int4Mat:
    """One int4 matrix in the kernel's layout: views of a slot or of a resident buffer."""

    w: torch.Tensor
    sz: torch.Tensor
    group: int
    n: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x [M, K] bf16 -> [M, N] bf16
        if x.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.w, self.group, self.sz)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.w.view(self.n, -1), self.group, self.sz)


@dataclass(frozen=True, slots=True)
class Int8Mat:
    """One int8 matrix with a scale per output row."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # bf16 [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x W^T for a plain weight tensor (in x's dtype) or a fused-kernel matrix (x and result in bf16)."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q int8 [N, K], scale fp32 [N]) with W ~ q * scale."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class QuantLinear(nn.Module):
    """A dense projection held in a fused-kernel layout (no bias). Takes and returns the caller's dtype."""

    def __init__(self, mat: Int4Mat | Int8Mat, out_features: int):
        super().__init__()
        self.mat, self.out_features = mat, out_features
        for i, t in enumerate(m for m in (getattr(mat, f, None) for f in ("w", "sz", "q", "scale")) if m is not None):
            self.register_buffer(f"t{i}", t, persistent=False)  # counted by .buffers() for memory figures

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mat(x.reshape(-1, x.shape[-1]).to(ACT))
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class QuantEmbedding(nn.Module):
    """Token embeddings as int8 rows with one scale each (the same rows serve a tied lm_head)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.dtype = dtype

    @property
    def weight(self) -> torch.Tensor:  # device and dtype of what the model computes in (meta only)
        return torch.empty(0, device=self.q.device, dtype=self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].to(self.dtype) * self.scale[ids].to(self.dtype)[..., None]
