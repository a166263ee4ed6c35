"""Lay several tensors out in one contiguous byte buffer, and view them back.

One expert = one buffer = one copy: w1, w2, w3 (or their quantized bytes plus scale
and zero) sit at aligned offsets described by a `Layout`. Views into the buffer give
the tensors back without copying, on whatever device the buffer is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes; keeps every view aligned for vector loads and for dtype itemsize

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32, "int64": torch.int64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a layout entry names ("bfloat16", "uint8", ...)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} in a packed layout; expected one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """Where each named tensor lives inside one packed buffer.

    `form` names how the bytes inside the entries are arranged where names, dtypes and shapes do not say
    it (e.g. "int4-cpu-avx2": torch's CPU int4 codes as its AVX2 kernel reads them): two layouts of one
    form are interchangeable byte for byte, two of different forms need a conversion.
    """

    entries: tuple[Entry, ...]
    nbytes: int
    form: str = ""

    @staticmethod
    def plan(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], form: str = "") -> Layout:
        """Offsets for (name, dtype, shape) in order, each aligned to ALIGN bytes."""
        entries, offset = [], 0
        for name, dtype, shape in specs:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            entries.append(Entry(name, dtype_name(dtype), tuple(shape), offset, nbytes))
            offset += -(-nbytes // ALIGN) * ALIGN
        return Layout(tuple(entries), offset, form)

    @staticmethod
    def of(tensors: dict[str, torch.Tensor]) -> Layout:
        return Layout.plan([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])

    def to_json(self) -> str:
        d = {"nbytes": self.nbytes, "entries": [e.__dict__ for e in self.entries]}
        return json.dumps({**d, "form": self.form} if self.form else d)

    @staticmethod
    def from_json(text: str) -> Layout:
        d = json.loads(text)
        entries = tuple(Entry(e["name"], e["dtype"], tuple(e["shape"]), e["offset"], e["nbytes"])
                        for e in d["entries"])
        if entries and entries[-1].offset + entries[-1].nbytes > d["nbytes"]:
            raise ValueError(f"layout overruns its buffer ({d['nbytes']} bytes)")
        return Layout(entries, d["nbytes"], d.get("form", ""))


def pack_into(buf: torch.Tensor, layout: Layout, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into the uint8 buffer `buf` at the layout's offsets."""
    if buf.dtype != torch.uint8 or buf.numel() != layout.nbytes:
        raise ValueError(f"buffer is {buf.dtype} x {buf.numel()}, layout needs uint8 x {layout.nbytes}")
    for view, e in zip(views(buf, layout).values(), layout.entries, strict=True):
        src = tensors[e.name]
        if tuple(src.shape) != e.shape or dtype_name(src.dtype) != e.dtype:
            raise ValueError(f"tensor {e.name!r} is {src.dtype} {tuple(src.shape)}, layout says {e.dtype} {e.shape}")
        view.copy_(src)


def pack(tensors: dict[str, torch.Tensor], pin: bool = False) -> tuple[torch.Tensor, Layout]:
    """A new uint8 buffer (pinned if asked) holding `tensors`, and its layout."""
    layout = Layout.of(tensors)
    buf = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
    pack_into(buf, layout, tensors)
    return buf, layout


def views(buf: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Named tensors viewing `buf` (uint8, 1-D) without copying."""
    out = {}
    for e in layout.entries:
        raw = buf[e.offset : e.offset + e.nbytes]
        out[e.name] = raw.view(torch_dtype(e.dtype)).view(e.shape)
    return out
