"""Quantized matrices in the layouts torch's fused kernels read, and the products with them.

Int4, groups of g along the input dimension (torch's `_weight_int4pack_mm_for_cpu` on the
CPU, `_weight_int4pack_mm` on CUDA, Ampere or newer). For W [N, K] they compute x W^T with

    W[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]        q in [0, 16)

HQQ's W = (q - z) * s is the same matrix with scale = s and zero = (8 - z) * s, so 2-, 3- and
4-bit HQQ codes (axis=1 groups) run on it unchanged. `scales_and_zeros` is bf16 [K/g, N, 2].

Packed codes:
- CPU: uint8 [N * K / 2] in a layout that depends on the CPU capability torch dispatches to
  (`torch.backends.cpu.get_cpu_capability()`; ATEN_CPU_CAPABILITY selects a lower one). Each is
  blocks of B output rows; inside block b, for each k, B/2 bytes; byte j holds two rows' codes:
      avx512   B = 64, byte j = q[64b + j, k] | q[64b + 32 + j, k] << 4
      avx2     B = 32, byte j = q[32b + j, k] | q[32b + 16 + j, k] << 4
      default  B = 32, byte j = q[32b + 2j, k] | q[32b + 2j + 1, k] << 4
  Which one this torch writes is not assumed: `native_cpu_layout` compares each with torch's own
  converter once, and `pack_int4_codes` writes that one (a few vector ops, ~6x faster than the
  converter) or, where none matches or N % B != 0, calls the converter itself.
- CUDA: torch's tiled int32 layout from `_convert_weight_to_int4pack` (input: uint8 [N, K/2],
  byte = q[n, 2i] << 4 | q[n, 2i + 1]), made on the device.

`int4_self_check` runs one small product through the packing and the kernel a run will use and
compares it with the dequantized matrix: a layout or a kernel that computes something else is
refused (the caller falls back to dequantization and says why), never used.

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


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype: t itself when it already is, without the op that `t.to(dtype)` dispatches even then
    (a decoding step makes hundreds of these; benchmarks/bench_cpu_step.py counts them)."""
    return t if t.dtype == dtype else t.to(dtype)


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
        return int4_self_check(device) if n % 16 == 0 else f"output width {n} is not a multiple of 16"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA int4 kernel needs compute capability 8.0 (Ampere) or newer"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            return f"torch {torch.__version__} has no CUDA int4 kernel"
        return int4_self_check(device) if n % 8 == 0 else f"output width {n} is not a multiple of 8"
    return f"no int4 kernel on {device.type}"


def int4_specs(prefix: str, n: int, k: int, group: int, device: torch.device | str) -> list[Spec]:
    """(name, dtype, shape) of one [n, k] int4 matrix in the kernel's layout: codes, then scales_and_zeros."""
    if torch.device(device).type == "cuda":
        t = _cuda_tiles(k)
        codes = (f"{prefix}.w", torch.int32, (n // 8, k // (t * 16), 32, t // 2))
    else:
        codes = (f"{prefix}.w", torch.uint8, (n, k // 2))
    return [codes, (f"{prefix}.sz", ACT, (k // group, n, 2))]


@dataclass(frozen=True)
class CpuInt4Layout:
    """One CPU capability's int4 code layout (see the module docstring): blocks of `block` rows; byte j
    of a block's column holds rows (j, j + block/2) when `halves`, else rows (2j, 2j + 1)."""

    name: str
    block: int
    halves: bool

    def _rows(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # codes [N, K] -> (low-nibble rows, high-nibble rows), each [N/B, B/2, K]
        n, k = codes.shape
        if self.halves:
            v = codes.view(n // self.block, 2, self.block // 2, k)
            return v[:, 0], v[:, 1]
        v = codes.view(n // self.block, self.block // 2, 2, k)
        return v[:, :, 0], v[:, :, 1]

    def _bytes(self, packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
        # packed [N*K/2] -> [N/B, B/2, K]: byte j of block b's column k
        return packed.view(n // self.block, k, self.block // 2).transpose(1, 2)

    def fits(self, n: int) -> bool:
        return n % self.block == 0

    def pack(self, codes: torch.Tensor, out: torch.Tensor) -> None:
        """codes uint8 [N, K] in [0, 16), N a multiple of `block` -> out uint8 [N*K/2] in this layout."""
        lo, hi = self._rows(codes)
        torch.bitwise_or(lo, hi << 4, out=self._bytes(out, *codes.shape))

    def unpack(self, packed: torch.Tensor, codes: torch.Tensor) -> None:
        """The inverse of `pack`: packed uint8 [N*K/2] -> codes uint8 [N, K]."""
        n, k = codes.shape
        if not self.fits(n):
            raise ValueError(f"output width {n}: the {self.name} int4 layout is unpacked here only for "
                             f"multiples of {self.block}")
        lo, hi = self._rows(codes)
        b = self._bytes(packed, n, k)
        torch.bitwise_and(b, 15, out=lo)
        torch.bitwise_right_shift(b, 4, out=hi)


CPU_LAYOUTS = {lay.name: lay for lay in (CpuInt4Layout("avx512", 64, True), CpuInt4Layout("avx2", 32, True),
                                         CpuInt4Layout("default", 32, False))}


def cpu_capability() -> str:
    """The CPU capability torch's kernels dispatch to here ("AVX512", "AVX2", "DEFAULT", ...)."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def native_cpu_layout() -> CpuInt4Layout | None:
    """The layout of CPU_LAYOUTS that this torch's CPU int4 converter writes on this CPU, found by comparing
    each with the converter on one random matrix; None when none matches (then the converter packs)."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=gen)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2).reshape(-1).view(torch.uint8)
    for lay in CPU_LAYOUTS.values():
        ours = torch.empty(128 * 32, dtype=torch.uint8)
        lay.pack(codes.to(torch.uint8), ours)
        if torch.equal(ours, theirs):
            return lay
    return None


def int4_form(device: torch.device | str, cpu: CpuInt4Layout | None = None) -> str:
    """The Layout form of int4 kernel matrices on device: "int4-cuda", or "int4-cpu-<layout>" (`cpu`, by
    default this CPU's; "int4-cpu-torch-<capability>" where torch's converter writes one we do not know)."""
    if torch.device(device).type == "cuda":
        return "int4-cuda"
    cpu = cpu or native_cpu_layout()
    return f"int4-cpu-{cpu.name}" if cpu else f"int4-cpu-torch-{cpu_capability().lower()}"


def pack_int4_codes(codes: torch.Tensor, out: torch.Tensor) -> None:
    """codes uint8 [N, K] in [0, 16) -> `out`, the kernel layout on out's device (see the module docstring)."""
    if out.device.type == "cuda":
        pairs = (codes[:, ::2] << 4) | codes[:, 1::2]
        out.copy_(torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), out.shape[-1] * 2))
        return
    lay = native_cpu_layout()
    if lay is not None and lay.fits(codes.shape[0]):
        lay.pack(codes, out.view(-1))
    else:
        out.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2).view(out.shape))


def unpack_int4_codes(packed: torch.Tensor, codes: torch.Tensor, layout: CpuInt4Layout) -> None:
    """CPU-layout packed codes (`layout`, e.g. a --prepack store's) -> codes uint8 [N, K], on packed's device."""
    layout.unpack(packed.view(-1), codes)


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
        w = self.w if self.w.dim() == 2 and self.w.shape[0] == self.n else self.w.view(self.n, -1)  # [N, K/2]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, self.group, self.sz)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in fp32."""
    want = want.float()
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()


CHECK_TOLERANCE = 0.02  # bf16 products of 128 terms: ~0.4% relative; a wrong layout gives ~100%


def int4_self_check(device: torch.device | str) -> str | None:
    """Why the int4 path (pack_int4_codes, then torch's kernel) does not compute the dequantized matrix's
    product on this device (None: it does). Checked once per device, for a matrix our packer lays out
    (128 rows) and one torch's converter does (48 rows on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _int4_check(device)


@functools.cache
def _int4_check(device: torch.device) -> str | None:
    gen = torch.Generator().manual_seed(1)
    k, group = 128, 32
    x = torch.randn(3, k, generator=gen).to(ACT)
    for n in (128, 48):
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
        scale = torch.rand(n, k // group, generator=gen) * 0.02 + 0.01
        zero = torch.rand(n, k // group, generator=gen) * 16
        (wspec, wdtype, wshape), (_, _, szshape) = int4_specs("m", n, k, group, device)
        w = torch.empty(wshape, dtype=wdtype, device=device)
        sz = torch.empty(szshape, dtype=ACT, device=device)
        try:
            pack_int4_codes(codes.to(device), w)
            pack_int4_meta(scale.to(device), zero.to(device), sz)
            got = Int4Mat(w, sz, group, n)(x.to(device)).cpu()
        except (RuntimeError, NotImplementedError) as e:
            return f"torch's int4 kernel failed on {_where(device)} ({str(e).splitlines()[0][:80]})"
        s, z = sz[..., 0].float().t().cpu(), sz[..., 1].float().t().cpu()  # what the kernel was given
        dense = (codes.float() - 8) * s.repeat_interleave(group, 1) + z.repeat_interleave(group, 1)
        err = relative_error(got, x.float() @ dense.t())
        if not err < CHECK_TOLERANCE:
            how = "torch's converter" if native_cpu_layout() is None or not native_cpu_layout().fits(n) \
                else f"the {native_cpu_layout().name} layout"
            return (f"torch's int4 kernel on {_where(device)} computes a {n}x{k} product {err:.2f} away (relative) "
                    f"from its dequantized matrix (codes packed by {how})")
    return None


def _where(device: torch.device) -> str:
    if device.type == "cpu":
        return f"this CPU (capability {cpu_capability()})"
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


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
        if x.dim() == 2:  # [N, K]: a decoding step's rows, no reshaping
            return cast(self.mat(cast(x, ACT)), x.dtype)
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
