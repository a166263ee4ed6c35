"""How a packed expert's bytes become the matrices the expert function multiplies with.

The seam between storage and compute. The store and the device cache move opaque
uint8 buffers laid out by `codec.layout`; at compute time the engine hands the codec
named views into the device slot (`offload.packing.views(slot, codec.layout)`) and
gets back the expert's matrices in the compute dtype on the device:

    codec.layout                      # Layout of ONE packed expert (same for every expert)
    mats = codec.decode(views)        # tuple of device tensors, in `codec.names` order
    y = expert_fn(x, *mats)           # e.g. swiglu_expert(x, w1, w2, w3)

Contract for implementations (plain here; HQQ in offload/quant.py):
- `layout`: a `Layout` whose `nbytes` is exactly what crosses the bus per expert.
- `names`: the matrix names decode returns, in order (e.g. ("w1", "w2", "w3")).
- `decode(views)`: `views` maps every entry name of `layout` to a tensor viewing the
  device slot (no copy was made). Returns the matrices on the slot's device in the
  codec's compute dtype. It must not allocate per call: any dequantized or converted
  output goes into scratch buffers the codec allocated once in its constructor, so the
  result is valid only until the next `decode` call (the engine consumes it first).
  It must not write into `views` (slots are shared cache state, never written back).
- `decode` may return the views themselves when they already are the matrices.
- Optional: `for_layer(layer)`, a codec for loading that layer's experts (`fill`, `convert`), where the
  stored form differs by layer; `decode` is the same for every layer.
- Optional, CPU only: `slot_layout` (what a slot holds, when it differs from `layout`) and
  `fill(pieces, slot_views)`, which writes one stored expert into a slot converting as it
  copies. The engine then sizes its slots by `slot_layout` and loads through `fill`; the
  bytes counted as moved are still `layout.nbytes`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from offload.packing import Layout, torch_dtype
from offload.store import Piece


class ExpertCodec(Protocol):
    layout: Layout
    names: tuple[str, ...]

    def decode(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]: ...


def for_layer(codec, layer: int):
    """The codec that loads `layer`'s experts: codecs whose stored form differs by layer (GGUF files mixing
    block types across layers, offload/ggml_codec.py) give one per layer; others serve every layer."""
    return codec.for_layer(layer) if hasattr(codec, "for_layer") else codec


def slot_layout(codec: ExpertCodec) -> Layout:
    """What a slot holds: the stored bytes, or (plain experts on the CPU) the codec's compute-dtype
    layout, or (quantized experts on a fused kernel) the kernel's layout, which `load_expert` fills
    by converting."""
    return getattr(codec, "slot_layout", codec.layout)


class PlainCodec:
    """Unquantized experts: the packed buffer holds the matrices in their stored dtype.

    When the stored dtype is the compute dtype, decode returns the slot views (zero copy).
    Otherwise (e.g. bf16 checkpoint, fp32 compute): on the CPU the slots hold the compute
    dtype, converted once when an expert is loaded (`fill`), so a cache hit costs nothing;
    on a GPU the slots keep the stored bytes (what crosses the bus) and decode converts into
    scratch buffers allocated once here.

    stack={"w13": ("w1", "w3")}: where w1 and w3 lie back to back in the slot (or in the scratch),
    decode returns them as one [2I, D] matrix named w13 in their place, so a decoding token runs
    one product for both, the same product a resident stacked matrix runs (bitwise the same sums).
    """

    def __init__(
        self, layout: Layout, names: tuple[str, ...], dtype: torch.dtype, device: torch.device | str,
        stack: dict[str, tuple[str, str]] | None = None,
    ):
        entries = {e.name: e for e in layout.entries}
        missing = [n for n in names if n not in entries]
        if missing:
            raise ValueError(f"layout has no tensors {missing}; it holds {sorted(entries)}")
        self.layout, self.names, self.dtype = layout, tuple(names), dtype
        self.slot_layout = layout
        self._scratch: dict[str, torch.Tensor] = {}
        convert = [n for n in names if torch_dtype(entries[n].dtype) != dtype]
        if convert and torch.device(device).type == "cpu":
            self.slot_layout = Layout.plan([(e.name, dtype if e.name in convert else torch_dtype(e.dtype), e.shape)
                                            for e in layout.entries])
        else:
            for n in convert:
                self._scratch[n] = torch.empty(entries[n].shape, dtype=dtype, device=device)
        self._stack = None
        for out, (a, b) in (stack or {}).items():
            if self._stackable(a, b, convert, device):
                self._stack = (out, a, b, entries[a].shape[0] + entries[b].shape[0], entries[a].shape[1])
                self.names = tuple(out if n == a else n for n in self.names if n != b)

    def _stackable(self, a: str, b: str, convert: list[str], device) -> bool:
        """Can decode return a and b as one matrix? In scratch (made so here), or back to back in the slot."""
        held = {e.name: e for e in self.slot_layout.entries}
        ea, eb = held[a], held[b]
        if ea.dtype != eb.dtype or ea.shape[1:] != eb.shape[1:] or (a in convert) != (b in convert):
            return False
        if a in self._scratch:
            both = torch.empty((ea.shape[0] + eb.shape[0], *ea.shape[1:]), dtype=self.dtype, device=device)
            self._scratch[a], self._scratch[b] = both[: ea.shape[0]], both[ea.shape[0] :]
            return True
        return eb.offset == ea.offset + ea.nbytes

    def scratch_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._scratch.values())

    def fill(self, pieces: list[Piece], slot_views: dict[str, torch.Tensor]) -> None:
        """Write one stored expert (host pieces laid out by `layout`) into a slot of `slot_layout`."""
        for e in self.layout.entries:
            p = next(p for p in pieces if p.offset <= e.offset and e.offset + e.nbytes <= p.offset + p.src.numel())
            raw = p.src[e.offset - p.offset : e.offset - p.offset + e.nbytes]
            slot_views[e.name].copy_(raw.view(torch_dtype(e.dtype)).view(e.shape))

    def convert(self, src: dict[str, torch.Tensor], slot_views: dict[str, torch.Tensor]) -> None:
        """Packed views `src` (already on the slot's device) -> a slot of `slot_layout`, casting."""
        for e in self.layout.entries:
            slot_views[e.name].copy_(src[e.name])

    def decode(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self._stack is not None:
            return self._decode_stacked(views)
        out = []
        for n in self.names:
            buf = self._scratch.get(n)
            if buf is None:
                out.append(views[n])
            else:
                out.append(buf.copy_(views[n]))
        return tuple(out)

    def _decode_stacked(self, views: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        stacked, a, b, rows, cols = self._stack
        out = []
        for n in self.names:
            if n != stacked:
                buf = self._scratch.get(n)
                out.append(views[n] if buf is None else buf.copy_(views[n]))
            elif a in self._scratch:
                self._scratch[a].copy_(views[a])
                self._scratch[b].copy_(views[b])
                out.append(self._scratch[a].as_strided((rows, cols), (cols, 1)))
            else:  # a, then b, back to back in the slot: one view over both
                out.append(views[a].as_strided((rows, cols), (cols, 1)))
        return tuple(out)
