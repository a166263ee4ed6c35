"""Experts stored in a CPU int4 kernel's own layout (`quantize_experts.py --prepack`).

The store holds, per expert, what FusedCodec's CPU slots hold (offload/fused.py): per kernel matrix
(w1 and w3 stacked as w13, then w2) the int4 codes in one of torch's CPU layouts and bf16
scales_and_zeros. The CPU layout depends on the CPU capability (offload/kernels.py: avx512, avx2,
default); the manifest names the one the store holds (`packing`: "int4-cpu-<layout>"; the older
"int4-cpu" is the avx512 layout).

Where the store's layout is the one this CPU's kernel reads, a slot is the stored bytes: a miss is a
plain copy, a host expert or a resident one reads the mapped file in place (as llama.cpp reads its
GGUF), and nothing is converted. Elsewhere (another CPU capability, or CUDA) each expert is converted
once when it is loaded: its codes unpacked from the stored layout and packed into the kernel's
(a nibble shuffle; scales_and_zeros are the same everywhere). 4-bit g64 costs 4.5 bits a weight
against hqq's 4.27 (bf16 scale and zero per group instead of 8-bit ones); 2- and 3-bit codes take 4
bits here too.

    codec.layout        the stored (and copied) bytes of one expert
    codec.slot_layout   what a slot holds: the kernel's layout on this device
    codec.convert(src_views, slot_views)   stored views on the slot's device -> the slot
    codec.fill(pieces, slot_views)         CPU: host pieces -> the slot, converting as it copies
    codec.decode(views) -> (Int4Mat, ...)  in `names` order, from a slot (or the stored bytes in place)
"""

from __future__ import annotations

import torch

from offload.fused import assemble, decode_kernel_mats, fused_unsupported, kernel_layout, output_matrices
from offload.kernels import CPU_LAYOUTS, CpuInt4Layout, Int4Mat, cpu_capability, native_cpu_layout, pack_int4_codes
from offload.packing import views
from offload.quant import QuantSpec
from offload.rows import RowsMat, pack_rows_codes, rows_from_torch_meta
from offload.store import Piece

LEGACY_PACKING = "int4-cpu"  # stores written before the layout was named: the avx512 layout


def packing_name(layout: CpuInt4Layout) -> str:
    """The manifest's `packing` for experts stored in this CPU layout."""
    return f"int4-cpu-{layout.name}"


def stored_cpu_layout(packing: str) -> CpuInt4Layout | None:
    """The CPU layout a manifest's `packing` names (None: not a prepacked store, e.g. "hqq")."""
    if packing == LEGACY_PACKING:
        return CPU_LAYOUTS["avx512"]
    name = packing.removeprefix("int4-cpu-")
    return CPU_LAYOUTS.get(name) if name != packing else None


PACKINGS = (*(packing_name(lay) for lay in CPU_LAYOUTS.values()), LEGACY_PACKING)


def prepack_unsupported(shapes: dict[str, tuple[int, int]], spec: QuantSpec, device: torch.device | str,
                        stack: dict[str, tuple[str, ...]] | None = None) -> str | None:
    """Why experts cannot be stored in, or read from, a CPU kernel layout here (None: they can)."""
    why = fused_unsupported(shapes, spec, "cpu") or fused_unsupported(shapes, spec, device)
    if why:
        return why
    _, _, out_shapes = output_matrices(shapes, stack)
    for name, (n, _) in out_shapes.items():
        if n % 64:
            return f"{name}: {n} output rows (the stored CPU layouts need a multiple of 64)"
    return None


def prepack_write_unsupported() -> str | None:
    """Why a store cannot be written in this CPU's own layout (None: it can)."""
    if native_cpu_layout() is None:
        return (f"torch's CPU int4 layout on this CPU (capability {cpu_capability()}) is none of "
                f"{', '.join(CPU_LAYOUTS)}; make the store without --prepack")
    return None


class PrepackedCodec:
    """Experts stored in a CPU int4 kernel layout (see the module docstring)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], spec: QuantSpec, device: torch.device | str,
                 stack: dict[str, tuple[str, ...]] | None = None, stored: CpuInt4Layout | None = None,
                 rows: bool = False):
        why = prepack_unsupported(shapes, spec, device, stack)
        if why:
            raise ValueError(f"experts in a CPU int4 kernel layout: {why}")
        self.stored = stored or CPU_LAYOUTS["avx512"]
        self.shapes, self.spec, self.group, self.rows = dict(shapes), spec, spec.group_size, rows
        self.groups, self.names, self.out_shapes = output_matrices(shapes, stack)
        self.layout = kernel_layout(self.names, self.out_shapes, self.group, "cpu", self.stored)
        self.slot_layout = kernel_layout(self.names, self.out_shapes, self.group, device, rows=rows)
        self.in_place = self.slot_layout == self.layout
        self._codes: dict[torch.device, torch.Tensor] = {}  # conversion scratch per device, allocated once
        self._host_buf: torch.Tensor | None = None

    def scratch_bytes(self) -> int:
        return 0 if self.in_place else max(n * k for n, k in self.out_shapes.values())

    def convert(self, src: dict[str, torch.Tensor], slot_views: dict[str, torch.Tensor]) -> None:
        """Stored views (one expert, `layout`) -> the slot's layout, on src's device."""
        for out in self.names:
            n, k = self.out_shapes[out]
            w = src[f"{out}.w"]
            if w.device not in self._codes:
                self._codes[w.device] = torch.empty(self.scratch_bytes(), dtype=torch.uint8, device=w.device)
            codes = self._codes[w.device][: n * k].view(n, k)
            self.stored.unpack(w.view(-1), codes)
            if self.rows:
                pack_rows_codes(codes, slot_views[f"{out}.w"])
                rows_from_torch_meta(src[f"{out}.sz"], slot_views[f"{out}.sz"])
            else:
                pack_int4_codes(codes, slot_views[f"{out}.w"])
                slot_views[f"{out}.sz"].copy_(src[f"{out}.sz"])

    def fill(self, pieces: list[Piece], slot_views: dict[str, torch.Tensor]) -> None:
        """One stored expert (host pieces) -> a CPU slot: converted, or copied where the layouts agree."""
        if self._host_buf is None:
            self._host_buf = torch.zeros(self.layout.nbytes, dtype=torch.uint8)
        src = assemble(pieces, self.layout.nbytes, self._host_buf)
        if self.in_place:
            for name, v in views(src, self.layout).items():
                slot_views[name].copy_(v)
            return
        self.convert(views(src, self.layout), slot_views)

    def decode(self, slot_views: dict[str, torch.Tensor]) -> tuple[Int4Mat | RowsMat, ...]:
        return decode_kernel_mats(self, slot_views)
