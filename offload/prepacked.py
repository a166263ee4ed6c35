"""Experts stored in the CPU int4 kernel's own layout (`quantize_experts.py --prepack`): nothing to convert.

The store holds, per expert, what FusedCodec's CPU slots hold (offload/fused.py): per kernel matrix
(w1 and w3 stacked as w13, then w2) the int4 codes in torch's CPU layout and bf16 scales_and_zeros.
On the CPU a slot is the stored bytes: a miss is a plain copy, a host expert or a resident one reads
the mapped file in place (as llama.cpp reads its GGUF), and no load converts anything. On CUDA
`convert` unpacks the codes on the device and repacks them for the CUDA kernel (scales_and_zeros are
the same on both). 4-bit g64 costs 4.5 bits a weight against hqq's 4.27 (bf16 scale and zero per group
instead of 8-bit ones); 2- and 3-bit codes take 4 bits here too.

    codec.layout        the stored (and copied) bytes of one expert: the CPU kernel's layout
    codec.slot_layout   what a slot holds: the same on the CPU, CUDA's layout on CUDA
    codec.convert(src_views, slot_views)   CUDA: stored views already on the device -> the slot
    codec.decode(views) -> (Int4Mat, ...)  in `names` order, from a slot or from the stored bytes
"""

from __future__ import annotations

import torch

from offload.fused import fused_unsupported, kernel_layout, output_matrices
from offload.kernels import Int4Mat, cpu_layout_is_ours, pack_int4_codes, unpack_int4_codes
from offload.quant import QuantSpec

PACKING = "int4-cpu"  # the manifest's name for this layout


def prepack_unsupported(shapes: dict[str, tuple[int, int]], spec: QuantSpec, device: torch.device | str,
                        stack: dict[str, tuple[str, ...]] | None = None) -> str | None:
    """Why experts cannot be stored in, or read from, the CPU kernel's layout here (None: they can)."""
    why = fused_unsupported(shapes, spec, "cpu") or fused_unsupported(shapes, spec, device)
    if why:
        return why
    _, _, out_shapes = output_matrices(shapes, stack)
    for name, (n, _) in out_shapes.items():
        if n % 64:
            return f"{name}: {n} output rows (the stored CPU layout needs a multiple of 64)"
    if not cpu_layout_is_ours():
        return f"torch {torch.__version__} lays out CPU int4 codes differently from the stores' layout"
    return None


class PrepackedCodec:
    """Experts stored in the CPU int4 kernel's layout (see the module docstring)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], spec: QuantSpec, device: torch.device | str,
                 stack: dict[str, tuple[str, ...]] | None = None):
        why = prepack_unsupported(shapes, spec, device, stack)
        if why:
            raise ValueError(f"experts in the CPU int4 kernel's layout: {why}")
        self.shapes, self.spec, self.group = dict(shapes), spec, spec.group_size
        self.groups, self.names, self.out_shapes = output_matrices(shapes, stack)
        self.layout = kernel_layout(self.names, self.out_shapes, self.group, "cpu")
        self.slot_layout = kernel_layout(self.names, self.out_shapes, self.group, device)
        self._codes: dict[torch.device, torch.Tensor] = {}  # CUDA conversion scratch, allocated once

    def scratch_bytes(self) -> int:
        return 0 if self.slot_layout == self.layout else max(n * k for n, k in self.out_shapes.values())

    def convert(self, src: dict[str, torch.Tensor], slot_views: dict[str, torch.Tensor]) -> None:
        """Stored views (one expert, `layout`) -> the slot's layout, on src's device."""
        for out in self.names:
            n, k = self.out_shapes[out]
            w = src[f"{out}.w"]
            if w.device not in self._codes:
                self._codes[w.device] = torch.empty(self.scratch_bytes(), dtype=torch.uint8, device=w.device)
            codes = self._codes[w.device][: n * k].view(n, k)
            unpack_int4_codes(w, codes)
            pack_int4_codes(codes, slot_views[f"{out}.w"])
            slot_views[f"{out}.sz"].copy_(src[f"{out}.sz"])

    def decode(self, slot_views: dict[str, torch.Tensor]) -> tuple[Int4Mat, ...]:
        return tuple(Int4Mat(slot_views[f"{o}.w"], slot_views[f"{o}.sz"], self.group, self.out_shapes[o][0])
                     for o in self.names)
