"""HQQ quantization of one matrix, its packed form, and an allocation-free dequantizer.

A matrix W [N, K] is quantized with hqq's half-quadratic optimiser in groups of
`group_size` weights: W ~ (q - zero) * scale, q in [0, 2^bits). hqq groups along
`axis`: axis=0 views W as [g, N*K/g] and groups down the columns of that view (when g
divides N: one input column, every (N/g)-th output row), axis=1 as [N*K/g, g] (a group
is g consecutive weights of a row). The packed parts
(names are prefixed "<matrix>."):

    q        hqq's bitpacked codes: uint8 [g*b/8, M] for 2/4/8 bits, int32 [ceil(g/10), M]
             for 3 bits (axis=0; transpose the roles for axis=1), M = N*K/g groups
    scale    float16 [1, M] (axis=0) or [M, 1]                       (meta_bits=16)
    zero     float16, same shape                                      (meta_bits=16)
    scale.q  uint8 [M/G2, G2], scale.s/scale.z float32 [M/G2, 1]      (meta_bits=8)
    zero.q   ..., zero.s, zero.z                                      (meta_bits=8)

meta_bits=16 is hqq's own storage (scale and zero in 16 bits: 2-bit g16 costs 4
bits/weight). meta_bits=8 is our format, the mixtral-offloading recipe: scale and zero
are themselves quantized to 8 bits with a min-max affine map in groups of G2
(`meta_group`) consecutive values, which is exactly hqq's 8-bit axis=1 format, so
hqq's `Quantizer.dequantize` reproduces it. After the metadata is rounded, the codes are
re-rounded against the stored scale/zero (q = round(W / scale + zero), as hqq's own
optimiser defines q for its final scale/zero), so the codes fit what is actually stored.

Dequantization (`HQQCodec`, an offload.codec ExpertCodec) runs on any device from views of
the packed buffer and writes into buffers allocated once; its arithmetic is hqq's (`Quantizer.dequantize`,
(q - zero) * scale in the compute dtype; the 8-bit metadata is dequantized in float32
and then cast), so the result is bitwise equal to hqq's dequantization of the same data.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from offload.hqq_fast import hqq_axis1
from offload.packing import Layout

Spec = tuple[str, torch.dtype, tuple]  # (name, dtype, shape) of one packed part

BITS = (2, 3, 4, 8)
_PER_WORD = {2: 4, 3: 10, 4: 2, 8: 1}  # codes per packed element (uint8, or int32 for 3 bits)


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of matrix is quantized."""

    bits: int
    group_size: int
    axis: int = 1  # 1: groups along the input dimension, what the fused int4 kernels read
    meta_bits: int = 8  # 16: hqq's fp16 scale/zero; 8: our 8-bit scale/zero, second level in G2
    meta_group: int = 128  # G2: values of scale (or zero) sharing one second-level scale/zero

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"unsupported bits {self.bits}: choose one of {BITS}")
        if self.group_size < 8 or self.group_size % 8:
            raise ValueError(f"unsupported group size {self.group_size}: must be a positive multiple of 8")
        if self.axis not in (0, 1):
            raise ValueError(f"unsupported axis {self.axis}: 0 or 1")
        if self.meta_bits not in (8, 16):
            raise ValueError(f"unsupported meta bits {self.meta_bits}: 8 or 16")
        if self.meta_group < 1:
            raise ValueError(f"meta group must be positive, got {self.meta_group}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> QuantSpec:
        return QuantSpec(**d)


def _grid(shape: tuple[int, int], spec: QuantSpec) -> tuple[int, int]:
    """Shape of hqq's grouped view of W: (g, M) for axis 0, (M, g) for axis 1."""
    n = shape[0] * shape[1]
    if n % spec.group_size:
        raise ValueError(f"group size {spec.group_size} does not divide a {shape[0]}x{shape[1]} matrix")
    m = n // spec.group_size
    return (spec.group_size, m) if spec.axis == 0 else (m, spec.group_size)


def _meta_group(m: int, spec: QuantSpec) -> int:
    """Second-level group: meta_group if it divides M, else one group for all M values."""
    return spec.meta_group if m % spec.meta_group == 0 else m


def matrix_specs(prefix: str, shape: tuple[int, int], spec: QuantSpec) -> list[Spec]:
    """(name, dtype, shape) of each packed part of one matrix, in packing order."""
    rows, cols = _grid(shape, spec)
    per = _PER_WORD[spec.bits]
    if spec.bits != 3 and rows % per:
        raise ValueError(f"{spec.bits}-bit packing needs {per} | {rows} rows of hqq's grouped view of "
                         f"{prefix} {tuple(shape)} (group size {spec.group_size}, axis {spec.axis})")
    q_dtype = torch.int32 if spec.bits == 3 else torch.uint8
    out = [(f"{prefix}.q", q_dtype, (-(-rows // per), cols))]
    m = rows * cols // spec.group_size
    meta_shape = (1, m) if spec.axis == 0 else (m, 1)
    for part in ("scale", "zero"):
        if spec.meta_bits == 16:
            out.append((f"{prefix}.{part}", torch.float16, meta_shape))
        else:
            g2 = _meta_group(m, spec)
            out += [(f"{prefix}.{part}.q", torch.uint8, (m // g2, g2)),
                    (f"{prefix}.{part}.s", torch.float32, (m // g2, 1)),
                    (f"{prefix}.{part}.z", torch.float32, (m // g2, 1))]
    return out


def expert_layout(shapes: dict[str, tuple[int, int]], spec: QuantSpec) -> Layout:
    """Layout of one packed expert (all its matrices, in the order of `shapes`)."""
    return Layout.plan([s for name, shape in shapes.items() for s in matrix_specs(name, shape, spec)])


def bits_per_weight(layout: Layout, shapes: dict[str, tuple[int, int]]) -> float:
    """Honest size: every byte of the packed buffer (codes, metadata, alignment) per weight."""
    return 8 * layout.nbytes / sum(a * b for a, b in shapes.values())


def _quant_meta(x: torch.Tensor, g2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit min-max affine quantization of x (flattened) in groups of g2: (q, s, z), x ~ (q - z) * s."""
    xg = x.float().reshape(-1, g2)
    lo, hi = xg.min(dim=1, keepdim=True)[0], xg.max(dim=1, keepdim=True)[0]
    s = (hi - lo) / 255.0
    s = torch.where(s > 0, s, torch.ones_like(s))  # constant group: any scale reproduces it
    z = -lo / s
    q = torch.round(xg / s + z).clamp_(0, 255).to(torch.uint8)
    return q, s, z


def _meta_ref(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Float32 values of 8-bit metadata: (q - z) * s, as hqq's 8-bit axis=1 dequantize computes."""
    return (q.float() - z) * s


METHODS = ("hqq", "hqq-fast", "rtn")  # hqq-fast: offload/hqq_fast.py, hqq's optimiser in chunks


def hqq_quantizer():
    """hqq's Quantizer, imported on first use: only `--method hqq` needs it (importing hqq pulls in
    torch's compiler, ~4 s), so a run, rtn and hqq-fast never import it."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as e:
        raise ImportError(f"hqq's optimiser needs the hqq package ({e}): pip install 'mixtral-lite[quantize]', "
                          "or use --method hqq-fast or rtn") from None
    return Quantizer


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """hqq's bit packing (BitPack.pack_2bit_u8 / pack_3bit_32 / pack_4bit_u8 / pack_8bit_u8), byte for byte,
    without importing hqq: row block i of the codes [rows, cols] goes to bit shift _SHIFTS[bits][i]."""
    # codes [rows, cols] in [0, 2^bits); out [ceil(rows / per), cols]; 3 bits pad rows to a multiple of 10
    per = _PER_WORD[bits]
    dtype = torch.int32 if bits == 3 else torch.uint8
    step = -(-codes.shape[0] // per)
    q = torch.zeros(step * per, codes.shape[1], dtype=dtype, device=codes.device)
    q[: codes.shape[0]] = codes
    if bits == 8:
        return q
    out = q[:step] << _SHIFTS[bits][0]
    for i, shift in enumerate(_SHIFTS[bits][1:], start=1):
        out |= q[i * step : (i + 1) * step] << shift
    return out


def _rtn(w: torch.Tensor, spec: QuantSpec, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest min-max scale/zero per group (hqq's grouped view and shapes): the fast method."""
    wg = w.float().reshape(rows, cols)
    dim = 0 if spec.axis == 0 else 1
    lo, hi = torch.aminmax(wg, dim=dim, keepdim=True)  # one pass over W, not two
    scale = (hi - lo) / (2**spec.bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale reproduces it
    return scale, -lo / scale


@torch.inference_mode()
def quantize_matrix(w: torch.Tensor, spec: QuantSpec, prefix: str, device: str | torch.device,
                    method: str = "hqq") -> dict:
    """Quantize W [N, K] on `device` (hqq's optimiser, or plain round-to-nearest); packed parts on the CPU."""
    shape = tuple(w.shape)
    rows, cols = _grid(shape, spec)
    if method == "rtn":
        meta = dict(zip(("scale", "zero"), _rtn(w.to(device), spec, rows, cols), strict=True))
    elif method == "hqq-fast" and spec.axis == 1:
        scale, zero = hqq_axis1(w.to(device), spec.bits, spec.group_size, round_zero=spec.bits == 4)
        meta = {"scale": scale, "zero": zero}
    elif method in ("hqq", "hqq-fast"):  # axis 0 couples groups across rows: hqq's own loop
        _, meta = hqq_quantizer().quantize(
            w.to(device), nbits=spec.bits, channel_wise=True, group_size=spec.group_size, optimize=True,
            round_zero=spec.bits == 4, axis=spec.axis, bitpack=False, device=str(device))
    else:
        raise ValueError(f"unknown quantization method {method!r}: one of {METHODS}")
    scale, zero = meta["scale"].float(), meta["zero"].float()  # hqq returns scale already inverted
    out: dict[str, torch.Tensor] = {}
    if spec.meta_bits == 16:
        scale, zero = scale.half(), zero.half()
        out[f"{prefix}.scale"], out[f"{prefix}.zero"] = scale.cpu(), zero.cpu()
    else:
        g2 = _meta_group(scale.numel(), spec)
        for part, val in (("scale", scale), ("zero", zero)):
            q, s, z = _quant_meta(val, g2)
            for k, v in zip("qsz", (q, s, z), strict=True):
                out[f"{prefix}.{part}.{k}"] = v.cpu()
        scale = _meta_ref(*[out[f"{prefix}.scale.{k}"] for k in "qsz"]).reshape(scale.shape).to(device)
        zero = _meta_ref(*[out[f"{prefix}.zero.{k}"] for k in "qsz"]).reshape(zero.shape).to(device)
    # Re-round the codes against the scale/zero actually stored (float32 arithmetic).
    wg = w.to(device=device, dtype=torch.float32).reshape(rows, cols)
    # in place after the one division: at 14336x4096 each temporary is 235 MB of memory traffic
    codes = wg.div(scale.float()).add_(zero.float()).round_().clamp_(0, 2**spec.bits - 1)
    return {f"{prefix}.q": pack_codes(codes, spec.bits).cpu(), **out}


def quantize_expert(mats: dict[str, torch.Tensor], spec: QuantSpec, device: str | torch.device,
                    method: str = "hqq") -> dict:
    """Packed parts of every matrix of one expert, in layout order."""
    out: dict[str, torch.Tensor] = {}
    for name, w in mats.items():
        out.update(quantize_matrix(w, spec, name, device, method))
    return out


def layout_to_dict(layout: Layout) -> dict:
    return json.loads(layout.to_json())


def layout_from_dict(d: dict) -> Layout:
    return Layout.from_json(json.dumps(d))


def hqq_reference(parts: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int], spec: QuantSpec,
                  dtype: torch.dtype) -> torch.Tensor:
    """hqq's own dequantization (`Quantizer.dequantize`) of one packed matrix: the test oracle."""
    Quantizer = hqq_quantizer()
    rows, cols = _grid(shape, spec)
    m = rows * cols // spec.group_size
    meta_shape = (1, m) if spec.axis == 0 else (m, 1)
    meta = {}
    for part in ("scale", "zero"):
        if spec.meta_bits == 16:
            meta[part] = parts[f"{prefix}.{part}"].to(dtype)
        else:
            q, s, z = (parts[f"{prefix}.{part}.{k}"] for k in "qsz")
            mm = {"nbits": 8, "packing": "8bit_u8", "view_as_float": False, "axis": 1,
                  "group_size": q.shape[1], "shape": meta_shape, "scale": s, "zero": z,
                  "compute_dtype": torch.float32}
            meta[part] = Quantizer.dequantize(q, mm).to(dtype)
    meta.update({"nbits": spec.bits, "packing": Quantizer.bit_to_packing[spec.bits], "view_as_float": False,
                 "axis": spec.axis, "group_size": spec.group_size, "shape": torch.Size(shape),
                 "compute_dtype": dtype})
    return Quantizer.dequantize(parts[f"{prefix}.q"], meta)


_SHIFTS = {b: [b * (_PER_WORD[b] - 1 - i) for i in range(_PER_WORD[b])] for b in BITS}


class HQQCodec:
    """Dequantizes one expert's packed views into output buffers allocated once (an ExpertCodec).

    `decode(views)` returns the matrices (views of its own buffers, valid until the next
    call) in the order of `shapes`. Nothing is allocated per call.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], spec: QuantSpec, device: torch.device | str,
                 dtype: torch.dtype):
        self.shapes, self.spec, self.dtype = dict(shapes), spec, dtype
        self.names = tuple(self.shapes)
        self.layout = expert_layout(self.shapes, spec)
        kw = {"device": device}
        self.out = {n: torch.empty(s, dtype=dtype, **kw) for n, s in self.shapes.items()}
        q_entries = [e for e in self.layout.entries if e.name.endswith(".q") and e.name.count(".") == 1]
        q_numel = max(math.prod(e.shape) for e in q_entries)
        self._iscratch = torch.empty(q_numel, dtype=torch.int32 if spec.bits == 3 else torch.uint8, **kw)
        m_max = max(math.prod(s) // spec.group_size for s in self.shapes.values())
        self._meta = {p: torch.empty(m_max, dtype=dtype, **kw) for p in ("scale", "zero")}
        self._meta32 = torch.empty(m_max, dtype=torch.float32, **kw)

    def scratch_bytes(self) -> int:
        """Bytes of the buffers allocated above (the dequantized matrices dominate: for memory budgets)."""
        ts = [*self.out.values(), self._iscratch, *self._meta.values(), self._meta32]
        return sum(t.numel() * t.element_size() for t in ts)

    def decode(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(self._matrix(views, name, shape) for name, shape in self.shapes.items())

    def _matrix(self, views: dict[str, torch.Tensor], name: str, shape: tuple[int, int]) -> torch.Tensor:
        # W_g [rows, cols] = hqq's grouped view of out; q [R, cols] packed codes
        spec = self.spec
        rows, cols = _grid(shape, spec)
        out_g = self.out[name].view(rows, cols)
        self._unpack(views[f"{name}.q"], out_g)
        m = rows * cols // spec.group_size
        meta_shape = (1, m) if spec.axis == 0 else (m, 1)
        scale = self._meta_values(views, f"{name}.scale", self._meta["scale"][:m].view(meta_shape))
        zero = self._meta_values(views, f"{name}.zero", self._meta["zero"][:m].view(meta_shape))
        out_g.sub_(zero).mul_(scale)
        return self.out[name]

    def _unpack(self, q: torch.Tensor, out_g: torch.Tensor) -> None:
        unpack_codes(q, self.spec.bits, out_g, self._iscratch)

    def _meta_values(self, views: dict[str, torch.Tensor], key: str, dst: torch.Tensor) -> torch.Tensor:
        return meta_values(views, key, self.spec, dst, self._meta32)


def unpack_codes(q: torch.Tensor, bits: int, out_g: torch.Tensor, scratch: torch.Tensor) -> None:
    """hqq's bit unpacking of q into out_g (hqq's grouped view): block i of rows holds the codes at
    bit shift _SHIFTS[i]. scratch: q's dtype, at least q.numel() elements."""
    step, rows = q.shape[0], out_g.shape[0]
    if bits == 8:
        out_g.copy_(q)
        return
    mask = (1 << bits) - 1
    for i, shift in enumerate(_SHIFTS[bits]):
        n = min(step, rows - i * step)  # 3 bits: hqq pads rows to a multiple of 10
        if n <= 0:
            break
        tmp = scratch[: n * q.shape[1]].view(n, q.shape[1])
        torch.bitwise_right_shift(q[:n], shift, out=tmp)
        tmp.bitwise_and_(mask)
        out_g[i * step : i * step + n].copy_(tmp)


def meta_values(views: dict[str, torch.Tensor], key: str, spec: QuantSpec, dst: torch.Tensor,
                scratch32: torch.Tensor | None) -> torch.Tensor:
    """Scale or zero (`key` = "<matrix>.scale" / ".zero") written into dst, as hqq computes them.

    scratch32 (fp32, at least the metadata's size) is needed only when dst is not fp32."""
    if spec.meta_bits == 16:
        return dst.copy_(views[key])
    q, s, z = views[f"{key}.q"], views[f"{key}.s"], views[f"{key}.z"]
    m32 = dst if dst.dtype == torch.float32 else scratch32[: q.numel()].view(q.shape)
    m32.view(q.shape).copy_(q).sub_(z).mul_(s)  # float32, as hqq's 8-bit dequantize with compute_dtype float32
    return dst if m32 is dst else dst.copy_(m32.view(dst.shape))
