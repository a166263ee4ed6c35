"""Int4 matrices row by row ("int4-rows"): the layout the CUDA expert kernels read (offload/triton_moe.py).

For W [N, K] in groups of g along the input dimension, the same arithmetic as torch's int4 kernels:

    W[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]        q in [0, 16)

    w   uint8 [N, K/2]       byte i of row n = q[n, 2i] | q[n, 2i + 1] << 4
    sz  bf16  [N, K/g, 2]    (scale, zero) of each group of each row

A row's codes and its groups' scales sit together, so a kernel that owns a block of rows streams
contiguous bytes, and the layout is the same on every device: what a host store holds is what a
device slot holds (a miss is a plain copy) and what a kernel can read in place from pinned host
memory. 4-bit g64 costs 4.5 bits a weight (bf16 scale and zero per group), like the CPU layouts.

`RowsMat` multiplies eagerly (any number of rows of x): the matrix is dequantized into the codec's
scratch (allocated once) and multiplied with F.linear; one decoding token on CUDA goes through the
fused kernels of offload/triton_moe.py instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offload.kernels import ACT

FORM = "int4-rows"


def rows_specs(prefix: str, n: int, k: int, group: int) -> list[tuple[str, torch.dtype, tuple]]:
    """(name, dtype, shape) of one [n, k] matrix in this layout: codes, then (scale, zero) pairs."""
    if k % group or group % 2:
        raise ValueError(f"{prefix}: input width {k} is not a multiple of the group size {group}")
    return [(f"{prefix}.w", torch.uint8, (n, k // 2)), (f"{prefix}.sz", ACT, (n, k // group, 2))]


def pack_rows_codes(codes: torch.Tensor, out: torch.Tensor) -> None:
    """codes uint8 [N, K] in [0, 16) -> out uint8 [N, K/2] (see the module docstring)."""
    torch.bitwise_or(codes[:, 0::2], codes[:, 1::2] << 4, out=out)


def unpack_rows_codes(packed: torch.Tensor, codes: torch.Tensor) -> None:
    """The inverse of pack_rows_codes."""
    torch.bitwise_and(packed, 15, out=codes[:, 0::2])
    torch.bitwise_right_shift(packed, 4, out=codes[:, 1::2])


def pack_rows_meta(scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> None:
    """HQQ's scale s and zero z, fp32 [N, K/g] -> out bf16 [N, K/g, 2] = (s, (8 - z) * s)."""
    out[..., 0].copy_(scale)
    out[..., 1].copy_((8.0 - zero) * scale)


def rows_from_torch_meta(sz_torch: torch.Tensor, out: torch.Tensor) -> None:
    """torch's scales_and_zeros [K/g, N, 2] -> this layout's [N, K/g, 2] (the same values)."""
    out.copy_(sz_torch.transpose(0, 1))


@dataclass(frozen=True, slots=True)
class RowsMat:
    """One int4-rows matrix: views of a slot (or of pinned host memory), and the dequantization scratch."""

    w: torch.Tensor  # uint8 [N, K/2]
    sz: torch.Tensor  # bf16 [N, K/g, 2]
    scratch: torch.Tensor  # >= N*K bytes * 3 (uint8 codes + bf16 matrix), on the compute device

    def dequantize(self) -> torch.Tensor:
        """W [N, K] bf16 in the scratch (valid until the next dequantize of this codec)."""
        n, half = self.w.shape
        k, groups = 2 * half, self.sz.shape[1]
        codes = self.scratch[: n * k].view(n, k)
        unpack_rows_codes(self.w, codes)
        w = self.scratch[n * k : 3 * n * k].view(ACT).view(n, groups, k // groups)
        w.copy_(codes.view(n, groups, k // groups))
        w.sub_(8).mul_(self.sz[..., :1]).add_(self.sz[..., 1:])
        return w.view(n, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x [M, K] bf16 -> [M, N] bf16
        return F.linear(x, self.dequantize())


def scratch_bytes(out_shapes: dict[str, tuple[int, int]]) -> int:
    """Bytes of RowsMat's dequantization scratch for the largest of these matrices."""
    return 3 * max(n * k for n, k in out_shapes.values())
