"""HQQ-packed experts -> torch's int4 kernel layout, once per load: an ExpertCodec whose slots hold
what the fused kernel reads, so a cache hit computes straight from the slot.

The store and the bus carry the packed HQQ bytes (codes + 8-bit scale/zero, `layout`); a slot
holds `slot_layout`: per output matrix the int4 codes in the kernel's layout and bf16
scales_and_zeros (offload/kernels.py). Matrices sharing an input width can be stacked into one
kernel matrix (`stack`, e.g. Mixtral's w1 and w3 as one [2I, D] product for a decoding token).

    codec.fill(pieces, slot_views)      CPU: host pieces -> slot, converting as it copies
    codec.convert(src_views, slot_views) any device: packed views already on the slot's device
    codec.decode(slot_views)            -> (Int4Mat, ...) in `names` order; nothing is computed

Requires groups along the input dimension (hqq axis=1) of a size the kernel takes, and 2-4 bits;
`fused_unsupported` says why not otherwise, and the caller falls back to dequantization.
"""

from __future__ import annotations

import torch

from offload.kernels import (
    CpuInt4Layout,
    Int4Mat,
    int4_form,
    int4_specs,
    int4_unsupported,
    pack_int4_codes,
    pack_int4_meta,
)
from offload.packing import Layout, views
from offload.quant import QuantSpec, _grid, expert_layout, meta_values, unpack_codes
from offload.rows import FORM as ROWS_FORM
from offload.rows import RowsMat, pack_rows_codes, pack_rows_meta, rows_specs
from offload.rows import scratch_bytes as rows_scratch_bytes
from offload.store import Piece


def fused_unsupported(shapes: dict[str, tuple[int, int]], spec: QuantSpec, device: torch.device | str) -> str | None:
    """Why experts of these shapes and settings cannot run on the fused int4 kernel (None: they can)."""
    if spec.bits > 4:
        return f"{spec.bits}-bit codes (the int4 kernel takes 2, 3 and 4 bits)"
    if spec.axis != 1:
        return "groups along the output dimension (hqq axis 0); the kernel needs axis 1: re-quantize"
    for name, (n, k) in shapes.items():
        why = int4_unsupported(n, k, spec.group_size, device)
        if why:
            return f"{name} {n}x{k}: {why}"
    return None


def output_matrices(shapes: dict[str, tuple[int, int]], stack: dict[str, tuple[str, ...]] | None):
    """(groups, names, out_shapes) of the kernel matrices: stacked groups first as given, then every
    matrix not stacked, ordered by their first part's place in `shapes`."""
    stack = dict(stack or {})
    taken = {m for parts in stack.values() for m in parts}
    for out, parts in stack.items():
        if len({shapes[p][1] for p in parts}) != 1:
            raise ValueError(f"stacking {parts} into {out}: input widths differ")
    groups = {**stack, **{n: (n,) for n in shapes if n not in taken}}
    names = tuple(sorted(groups, key=lambda o: min(list(shapes).index(p) for p in groups[o])))
    out_shapes = {o: (sum(shapes[p][0] for p in ps), shapes[ps[0]][1]) for o, ps in groups.items()}
    return groups, names, out_shapes


def kernel_layout(names, out_shapes: dict[str, tuple[int, int]], group: int, device: torch.device | str,
                  cpu: CpuInt4Layout | None = None, rows: bool = False) -> Layout:
    """The kernel matrices of one expert in one buffer: on the CPU in `cpu`'s code layout (default: the one
    this CPU's kernel reads), on CUDA in torch's CUDA layout; with `rows`, the int4-rows layout of the CUDA
    table kernels (offload/rows.py), the same on every device."""
    if rows:
        return Layout.plan([s for o in names for s in rows_specs(o, *out_shapes[o], group)], ROWS_FORM)
    device = torch.device(device)
    form = int4_form(device, cpu)
    return Layout.plan([s for o in names for s in int4_specs(o, *out_shapes[o], group, device)], form)


def rows_unsupported(shapes: dict[str, tuple[int, int]], spec: QuantSpec) -> str | None:
    """Why experts of these shapes and settings cannot be held in the int4-rows layout (None: they can)."""
    if spec.bits > 4:
        return f"{spec.bits}-bit codes (the int4 kernels take 2, 3 and 4 bits)"
    if spec.axis != 1:
        return "groups along the output dimension (hqq axis 0); the kernels need axis 1: re-quantize"
    for name, (_, k) in shapes.items():
        if k % spec.group_size or spec.group_size % 2:
            return f"{name}: input width {k} is not a multiple of the group size {spec.group_size}"
    return None


def _whole(pieces: list[Piece], nbytes: int) -> bool:
    return len(pieces) == 1 and pieces[0].offset == 0 and pieces[0].src.numel() >= nbytes


def assemble(pieces: list[Piece], nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
    """One stored expert's `nbytes` as one host tensor: the piece itself when it is whole, else the pieces
    copied into `buf` (host scratch the caller allocated once)."""
    if _whole(pieces, nbytes):
        return pieces[0].src[:nbytes]
    for p in pieces:
        buf[p.offset : p.offset + p.src.numel()].copy_(p.src)
    return buf[:nbytes]


class FusedCodec:
    """Packed HQQ experts converted at load into torch's int4 layout (see the module docstring)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], spec: QuantSpec, device: torch.device | str,
                 stack: dict[str, tuple[str, ...]] | None = None, rows: bool = False):
        why = rows_unsupported(shapes, spec) if rows else fused_unsupported(shapes, spec, device)
        if why:
            raise ValueError(f"fused int4 kernel unavailable: {why}")
        self.shapes, self.spec, self.rows = dict(shapes), spec, rows
        self.layout = expert_layout(self.shapes, spec)
        self.groups, self.names, self.out_shapes = output_matrices(shapes, stack)
        self.slot_layout = kernel_layout(self.names, self.out_shapes, spec.group_size, device, rows=rows)
        # scratch on the conversion's device, allocated once: codes and fp32 scale/zero of the largest
        # output matrix, and one packed code tensor (uint8; int32 for 3 bits, viewed)
        n_k = max(n * k for n, k in self.out_shapes.values())
        q_max = max(e.nbytes for e in self.layout.entries if e.name.endswith(".q"))
        self._scratch_sizes = {"codes": n_k, "bits": q_max}
        self._meta_size = n_k // spec.group_size
        self._scratch: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._host_buf: torch.Tensor | None = None

    def _buffers(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._scratch:
            bufs = {k: torch.empty(n, dtype=torch.uint8, device=device) for k, n in self._scratch_sizes.items()}
            for k in ("scale", "zero"):
                bufs[k] = torch.empty(self._meta_size, dtype=torch.float32, device=device)
            self._scratch[device] = bufs
        return self._scratch[device]

    def scratch_bytes(self) -> int:
        """Device bytes `_buffers` allocates for conversions on a device (for memory budgets)."""
        return sum(self._scratch_sizes.values()) + 2 * 4 * self._meta_size

    def convert(self, src: dict[str, torch.Tensor], slot_views: dict[str, torch.Tensor]) -> None:
        """Packed views `src` (one expert, `layout`) -> the slot's kernel layout, on src's device."""
        g = self.spec.group_size
        for out in self.names:
            n, k = self.out_shapes[out]
            buf = self._buffers(src[f"{self.groups[out][0]}.q"].device)
            codes, scale, zero = buf["codes"][: n * k].view(n, k), buf["scale"], buf["zero"]
            row = 0
            for part in self.groups[out]:
                pn = self.shapes[part][0]
                self._unpack_into(src, part, codes[row : row + pn], buf)
                m = slice(row * k // g, (row + pn) * k // g)
                # fp32 destinations: meta_values writes them directly and needs no scratch of its own
                meta_values(src, f"{part}.scale", self.spec, scale[m].view(-1, 1), None)
                meta_values(src, f"{part}.zero", self.spec, zero[m].view(-1, 1), None)
                row += pn
            scale_nk, zero_nk = scale[: n * k // g].view(n, k // g), zero[: n * k // g].view(n, k // g)
            if self.rows:
                pack_rows_codes(codes, slot_views[f"{out}.w"])
                pack_rows_meta(scale_nk, zero_nk, slot_views[f"{out}.sz"])
            else:
                pack_int4_codes(codes, slot_views[f"{out}.w"])
                pack_int4_meta(scale_nk, zero_nk, slot_views[f"{out}.sz"])

    def _unpack_into(self, src: dict[str, torch.Tensor], part: str, codes: torch.Tensor, buf: dict) -> None:
        q = src[f"{part}.q"]
        rows, cols = _grid(self.shapes[part], self.spec)  # axis 1: [N*K/g, g], i.e. codes' own rows
        scratch = buf["bits"].view(q.dtype) if q.dtype == torch.int32 else buf["bits"]
        unpack_codes(q, self.spec.bits, codes.view(rows, cols), scratch)

    def fill(self, pieces: list[Piece], slot_views: dict[str, torch.Tensor]) -> None:
        """One stored expert (host pieces laid out by `layout`) -> a CPU slot of `slot_layout`."""
        if self._host_buf is None and not _whole(pieces, self.layout.nbytes):
            self._host_buf = torch.zeros(self.layout.nbytes, dtype=torch.uint8)
        self.convert(views(assemble(pieces, self.layout.nbytes, self._host_buf), self.layout), slot_views)

    def decode(self, slot_views: dict[str, torch.Tensor]) -> tuple[Int4Mat | RowsMat, ...]:
        return decode_kernel_mats(self, slot_views)


def decode_kernel_mats(codec, slot_views: dict[str, torch.Tensor]) -> tuple[Int4Mat | RowsMat, ...]:
    """A slot's kernel matrices in `names` order: Int4Mat views, or RowsMat views sharing the codec's
    dequantization scratch on the slot's device (allocated on first use there, once)."""
    g = codec.spec.group_size
    if not codec.rows:
        return tuple(Int4Mat(slot_views[f"{o}.w"], slot_views[f"{o}.sz"], g, codec.out_shapes[o][0])
                     for o in codec.names)
    device = slot_views[f"{codec.names[0]}.w"].device
    scratch = codec.__dict__.setdefault("_rows_scratch", {})
    if device not in scratch:
        scratch[device] = torch.empty(rows_scratch_bytes(codec.out_shapes), dtype=torch.uint8, device=device)
    return tuple(RowsMat(slot_views[f"{o}.w"], slot_views[f"{o}.sz"], scratch[device]) for o in codec.names)
