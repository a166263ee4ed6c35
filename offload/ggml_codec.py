"""Experts stored as GGML blocks (a GGUF file's bytes), converted at each load into torch's int4 layout.

The host store holds (or maps) an expert's matrices as the file has them: per matrix, rows of GGML
blocks (offload/ggml.py), one entry per matrix in `layout`, sized for the largest type any layer uses
(llama.cpp's Q4_K_M mix stores some layers' down-projections in Q6_K). A slot holds what FusedCodec's
slots hold (offload/fused.py): per kernel matrix (w1 and w3 stacked as w13, then w2) int4 codes in the
kernel's layout and bf16 scales_and_zeros, group 32, so a hit computes straight from the slot (with
rows=True the int4-rows layout of the CUDA table kernels instead, offload/rows.py).

    codec.for_layer(layer).fill(pieces, slot_views)    CPU: host pieces -> slot, converting
    codec.for_layer(layer).convert(src, slot_views)    any device: stored views already there -> slot
    codec.decode(slot_views) -> (Int4Mat, ...)         in `names` order; the same for every layer

Q4_0, Q4_1 and Q4_K are int4 codes already (exact up to the bf16 rounding of scale and zero); other
types are dequantized and re-quantized to 4 bits, round to nearest, per 32 weights (lossy, and slower).
The conversion runs per load: per miss, or once per expert where every expert stays cached.
"""

from __future__ import annotations

import torch

from offload.fused import decode_kernel_mats, kernel_layout, output_matrices
from offload.ggml import GROUP, BlockType, dequantize, int4_form, requantize_int4, row_bytes
from offload.kernels import Int4Mat, int4_unsupported, pack_int4_codes
from offload.packing import Layout
from offload.quant import QuantSpec
from offload.rows import RowsMat, pack_rows_codes
from offload.store import Piece


def ggml_int4_unsupported(shapes: dict[str, tuple[int, int]], device: torch.device | str) -> str | None:
    """Why experts of these shapes cannot run on the int4 kernels here (None: they can)."""
    for name, (n, k) in shapes.items():
        why = int4_unsupported(n, k, GROUP, device)
        if why:
            return f"{name} {n}x{k}: {why}"
    return None


def ggml_layout(shapes: dict[str, tuple[int, int]], types: list[dict[str, BlockType]],
                order: tuple[str, ...]) -> Layout:
    """One stored expert: each matrix's rows of blocks, sized for the largest type any layer gives it."""
    widths = {m: max(row_bytes(layer[m], shapes[m][1]) for layer in types) for m in order}
    return Layout.plan([(m, torch.uint8, (shapes[m][0], widths[m])) for m in order], "ggml-blocks")


def write_meta(scale: torch.Tensor, zero: torch.Tensor, out: torch.Tensor) -> None:
    """scale and zero fp32 [N, K/g] (W = (q - 8) * scale + zero) -> the kernels' scales_and_zeros [K/g, N, 2].
    Each (scale, zero) pair is rounded to bf16 in place, then the pairs are transposed as 32-bit words."""
    pairs = torch.stack([scale, zero], dim=-1).to(out.dtype)  # [N, K/g, 2]
    out.view(torch.int32).view(out.shape[:2]).copy_(pairs.view(torch.int32).view(pairs.shape[:2]).t())


class GGMLCodec:
    """GGML-block experts converted at load into the int4 kernel's layout (see the module docstring).

    shapes: each matrix's [rows, cols]; types[layer][name]: its GGML type in that layer; order: the
    matrices' order in the stored buffer (w1 and w3 adjacent: they are read together).
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], types: list[dict[str, BlockType]],
                 device: torch.device | str, stack: dict[str, tuple[str, ...]] | None = None,
                 order: tuple[str, ...] | None = None, rows: bool = False):
        why = None if rows else ggml_int4_unsupported(shapes, device)
        if why:
            raise ValueError(f"int4 kernel unavailable: {why}")
        self.shapes, self.types, self.rows, self.spec = dict(shapes), types, rows, QuantSpec(4, GROUP)
        self.layout = ggml_layout(shapes, types, order or tuple(shapes))
        self.groups, self.names, self.out_shapes = output_matrices(shapes, stack)
        self.slot_layout = kernel_layout(self.names, self.out_shapes, GROUP, device, rows=rows)
        self.requantized = sorted({t.name for layer in types for t in layer.values() if not t.int4})
        n_k = max(n * k for n, k in self.out_shapes.values())
        part = max(n * k for n, k in shapes.values()) if self.requantized else 0
        self._sizes = {"codes": n_k, "meta": 2 * n_k // GROUP * 4, "dense": part * 4}
        # temporaries of a conversion (shifted nibbles, bf16 pairs, dequantized rows' products), taken from
        # torch's caching allocator on the conversion's stream: counted for budgets, not held here
        self._temporary = max(e.nbytes for e in self.layout.entries) + n_k // GROUP * 4 + part * 8
        self._scratch: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._host_buf: torch.Tensor | None = None

    def scratch_bytes(self) -> int:
        """Device bytes a conversion needs on a device (for memory budgets): its scratch, allocated once, and
        its temporaries."""
        return sum(self._sizes.values()) + self._temporary

    def _buffers(self, device: torch.device) -> dict[str, torch.Tensor]:
        if device not in self._scratch:
            meta = torch.empty(self._sizes["meta"] // 4, dtype=torch.float32, device=device)
            self._scratch[device] = {
                "codes": torch.empty(self._sizes["codes"], dtype=torch.uint8, device=device),
                "scale": meta[: meta.numel() // 2], "zero": meta[meta.numel() // 2 :],
                "dense": torch.empty(self._sizes["dense"] // 4, dtype=torch.float32, device=device)}
        return self._scratch[device]

    def for_layer(self, layer: int) -> _LayerCodec:
        return _LayerCodec(self, self.types[layer])

    def stored(self, src: dict[str, torch.Tensor], types: dict[str, BlockType]) -> dict[str, torch.Tensor]:
        """Each matrix's blocks [rows, row bytes of its type] from views of a stored buffer (`layout`)."""
        out = {}
        for name, (n, k) in self.shapes.items():
            out[name] = src[name].view(-1)[: n * row_bytes(types[name], k)].view(n, -1)
        return out

    def convert_blocks(self, blocks: dict[str, torch.Tensor], types: dict[str, BlockType],
                       slot_views: dict[str, torch.Tensor]) -> None:
        """Each matrix's blocks (on the slot's device) -> the slot's kernel layout."""
        for out in self.names:
            n, k = self.out_shapes[out]
            buf = self._buffers(blocks[self.groups[out][0]].device)
            codes = buf["codes"][: n * k].view(n, k)
            scale, zero = buf["scale"][: n * k // GROUP].view(n, -1), buf["zero"][: n * k // GROUP].view(n, -1)
            row = 0
            for part in self.groups[out]:
                pn, t = self.shapes[part][0], types[part]
                rows = slice(row, row + pn)
                if t.int4:
                    int4_form(t, blocks[part], codes[rows], scale[rows], zero[rows])
                else:  # no 4-bit form: dequantize, then round to the nearest of 16 levels per 32 weights
                    w = dequantize(t, blocks[part], buf["dense"][: pn * k].view(pn, k))
                    requantize_int4(w, codes[rows], scale[rows], zero[rows])
                row += pn
            if self.rows:  # the int4-rows layout (offload/rows.py): (scale, zero) pairs row by row
                pack_rows_codes(codes, slot_views[f"{out}.w"])
                slot_views[f"{out}.sz"].copy_(torch.stack([scale, zero], dim=-1))
            else:
                pack_int4_codes(codes, slot_views[f"{out}.w"])
                write_meta(scale, zero, slot_views[f"{out}.sz"])

    def host_blocks(self, pieces: list[Piece], types: dict[str, BlockType]) -> dict[str, torch.Tensor]:
        """Each matrix's blocks from host pieces: views where a matrix lies in one piece, else assembled."""
        entries = {e.name: e for e in self.layout.entries}
        out = {}
        for name, (n, k) in self.shapes.items():
            e, nbytes = entries[name], n * row_bytes(types[name], k)
            p = next((p for p in pieces if p.offset <= e.offset and e.offset + nbytes <= p.offset + p.src.numel()),
                     None)
            if p is None:  # the matrix straddles pieces (a pinned RAM store's blocks): one host copy
                if self._host_buf is None:
                    self._host_buf = torch.zeros(self.layout.nbytes, dtype=torch.uint8)
                for q in pieces:
                    self._host_buf[q.offset : q.offset + q.src.numel()].copy_(q.src)
                raw = self._host_buf[e.offset : e.offset + nbytes]
            else:
                raw = p.src[e.offset - p.offset : e.offset - p.offset + nbytes]
            out[name] = raw.view(n, -1)
        return out

    def decode(self, slot_views: dict[str, torch.Tensor]) -> tuple[Int4Mat | RowsMat, ...]:
        return decode_kernel_mats(self, slot_views)


class _LayerCodec:
    """A GGMLCodec bound to one layer's types: the converting loads of that layer's experts."""

    def __init__(self, codec: GGMLCodec, types: dict[str, BlockType]):
        self.codec, self.types = codec, types
        self.layout, self.slot_layout, self.names = codec.layout, codec.slot_layout, codec.names

    def fill(self, pieces: list[Piece], slot_views: dict[str, torch.Tensor]) -> None:
        """One stored expert (host pieces laid out by `layout`) -> a CPU slot of `slot_layout`."""
        self.codec.convert_blocks(self.codec.host_blocks(pieces, self.types), self.types, slot_views)

    def convert(self, src: dict[str, torch.Tensor], slot_views: dict[str, torch.Tensor]) -> None:
        """Views of one stored expert already on the slot's device -> the slot."""
        self.codec.convert_blocks(self.codec.stored(src, self.types), self.types, slot_views)

    def decode(self, slot_views: dict[str, torch.Tensor]) -> tuple[Int4Mat | RowsMat, ...]:
        return self.codec.decode(slot_views)

    def scratch_bytes(self) -> int:
        return self.codec.scratch_bytes()
