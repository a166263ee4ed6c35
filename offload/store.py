"""Host-side home of every expert: packed in RAM, or read through a memory map.

A store answers one question: where are the bytes of packed expert (layer, expert)?
It answers with `Piece`s: host uint8 tensors and where each lands in the packed buffer
(`store.layout`). Moving them to the device is offload/transfer.py's job.

    SafetensorsSource  (--store mmap)  nothing loaded up front; the checkpoint's files are
        memory-mapped and each expert is its tensors' regions in the files: 3 pieces for a
        Hugging Face fp checkpoint (w1, w2, w3 are separate tensors), 1 for a packed
        (quantized) store. After a copy, `release` drops the touched pages from this
        process (madvise DONTNEED) so RSS stays near zero for the experts.
    RamStore           (--store ram)   every expert packed once into host memory (pinned when
        the device is CUDA, in power-of-two blocks so CUDA's host allocator does not round 22 GiB up
        to 32; pageable with a warning when pinning fails), filled one expert at a time from a
        source: the experts never exist twice in memory. One piece per expert (two where an expert
        straddles blocks).
"""

from __future__ import annotations

import bisect
import json
import mmap
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from offload.packing import Layout, dtype_name

# safetensors dtype tags -> torch dtypes
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}
MAX_HEADER = 100 << 20  # a larger header means a corrupt length field
# madvise is Unix-only (Python 3.8+ on Linux/macOS): on Windows pages stay mapped until the OS trims them
CAN_DROP_PAGES = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


class StoreError(ValueError):
    """A store that is unreadable or does not match what the model expects."""


@dataclass(frozen=True)
class Piece:
    src: torch.Tensor  # uint8, 1-D, host memory (RAM buffer or a view of a mapped file)
    offset: int  # byte offset of `src` inside the packed expert buffer


class ExpertStore(Protocol):
    layout: Layout  # packed form of one expert; layout.nbytes bytes cross the bus per load
    num_layers: int
    num_experts: int
    pinned: bool  # pieces live in page-locked memory (async CUDA copies straight from them)
    host_bytes: int  # bytes the store keeps resident in host memory

    def pieces(self, layer: int, expert: int) -> list[Piece]: ...
    def release(self, layer: int, expert: int) -> None: ...


@dataclass(frozen=True)
class TensorInfo:
    file: int  # index into the source's file list
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte LE length + JSON) without touching the data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise StoreError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER):
            raise StoreError(f"{path}: header length {n} does not fit the file ({size} bytes); truncated?")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: unreadable safetensors header ({e})") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict) or meta.get("dtype") not in ST_DTYPES:
            tag = meta.get("dtype") if isinstance(meta, dict) else meta
            raise StoreError(f"{path}: tensor {name!r} has unsupported dtype {tag!r}")
        offsets = meta.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets):
            raise StoreError(f"{path}: tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
        begin, end = offsets
        out[name] = TensorInfo(-1, ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin, end - begin)
    return out


def readonly_bytes(mm: mmap.mmap) -> torch.Tensor:
    """A read-only mapping as a uint8 tensor (torch warns that it cannot be written: nothing writes to it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mm, dtype=torch.uint8)


class SafetensorsSource:
    """Experts read straight out of (possibly sharded) safetensors files via mmap.

    names(layer, expert) -> {role: tensor name}. Two forms:
    - unpacked (layout=None): one tensor per role, e.g. {"w1": ..., "w2": ..., "w3": ...};
      `shapes` gives each role's expected shape; the layout is planned from the roles in
      order with the files' dtypes, so the packed bytes are exactly the file bytes.
    - packed (layout given): one uint8 tensor per expert holding `layout.nbytes` bytes, the
      packed buffer itself (the quantized store).
    Every expert is checked when the source opens; errors name the layer and expert.
    """

    pinned = False
    host_bytes = 0

    def __init__(
        self, files: list[Path], num_layers: int, num_experts: int,
        names: Callable[[int, int], dict[str, str]],
        shapes: dict[str, tuple[int, ...]] | None = None, layout: Layout | None = None,
    ):
        self.files = [Path(f) for f in files]
        self.num_layers, self.num_experts = num_layers, num_experts
        self._index: dict[str, TensorInfo] = {}
        self._sizes = [f.stat().st_size for f in self.files]
        for i, f in enumerate(self.files):
            for name, info in read_header(f).items():
                self._index[name] = TensorInfo(i, info.dtype, info.shape, info.start, info.nbytes)
        self._maps: list[tuple[mmap.mmap, torch.Tensor] | None] = [None] * len(self.files)
        first = names(0, 0)
        self.packed = layout is not None  # one tensor per expert holding the whole packed buffer
        if layout is None:
            if shapes is None or set(shapes) != set(first):
                raise ValueError(f"unpacked source needs a shape per role {sorted(first)}, got {shapes}")
            specs = [(role, self._info(0, 0, role, names(0, 0)[role]).dtype, shapes[role]) for role in first]
            layout = Layout.plan(specs)
        elif len(first) != 1:
            raise ValueError(f"a packed source has one tensor per expert, names() gave {sorted(first)}")
        self.layout = layout
        self._regions = [[self._check(layer, e, names(layer, e)) for e in range(num_experts)]
                         for layer in range(num_layers)]

    def _info(self, layer: int, expert: int, role: str, name: str) -> TensorInfo:
        info = self._index.get(name)
        if info is None:
            raise StoreError(f"layer {layer} expert {expert}: tensor {name!r} ({role}) is not in the store "
                             f"({len(self.files)} file(s) under {self.files[0].parent}); "
                             "does the store match the model's config?")
        return info

    def _check(self, layer: int, expert: int, names: dict[str, str]) -> list[tuple[int, int, int, int]]:
        """(file, start, nbytes, offset in packed buffer) per tensor of one expert, validated."""
        where = f"layer {layer} expert {expert}"
        regions = []
        entries = {e.name: e for e in self.layout.entries}
        for role, name in names.items():
            info = self._info(layer, expert, role, name)
            if self.packed:
                want_dtype, want_shape, offset = "uint8", (self.layout.nbytes,), 0
            else:
                e = entries[role]
                want_dtype, want_shape, offset = e.dtype, e.shape, e.offset
            if dtype_name(info.dtype) != want_dtype or info.shape != want_shape:
                raise StoreError(f"{where}: tensor {name!r} in {self.files[info.file]} is "
                                 f"{dtype_name(info.dtype)} {info.shape}, expected {want_dtype} {want_shape}")
            want_bytes = torch.Size(want_shape).numel() * info.dtype.itemsize
            if info.nbytes != want_bytes:
                raise StoreError(f"{where}: tensor {name!r} spans {info.nbytes} bytes, not {want_bytes}")
            end, size = info.start + info.nbytes, self._sizes[info.file]
            if end > size:
                raise StoreError(f"{where}: tensor {name!r} ends at byte {end} but {self.files[info.file]} "
                                 f"has {size} bytes (truncated file?)")
            regions.append((info.file, info.start, info.nbytes, offset))
        return regions

    def _map(self, i: int) -> tuple[mmap.mmap, torch.Tensor]:
        if self._maps[i] is None:
            with open(self.files[i], "rb") as f:
                # read-only and shared: nothing writes to it, and a private writable map (MAP_PRIVATE) of
                # a file larger than RAM is refused by the kernel's overcommit check (ENOMEM)
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[i] = (mm, readonly_bytes(mm))
        return self._maps[i]

    def pieces(self, layer: int, expert: int) -> list[Piece]:
        out = []
        for file, start, nbytes, offset in self._regions[layer][expert]:
            out.append(Piece(self._map(file)[1][start : start + nbytes], offset))
        return out

    def release(self, layer: int, expert: int) -> None:
        """Drop this expert's pages from the process (re-read from the page cache or disk if needed)."""
        if not CAN_DROP_PAGES:
            return
        page = mmap.PAGESIZE
        for file, start, nbytes, _ in self._regions[layer][expert]:
            mm = self._maps[file]
            if mm is None:
                continue
            lo, hi = start // page * page, min(-(-(start + nbytes) // page) * page, self._sizes[file])
            mm[0].madvise(mmap.MADV_DONTNEED, lo, hi - lo)


PIN_CHUNK = 1 << 28  # 256 MiB: page-locked in power-of-two blocks, which CUDA's host allocator takes as they are
PIN_MIN = 1 << 20  # the tail is split down to 1 MiB blocks: at most 1 MiB pinned beyond the experts


def pin_chunks(total: int, chunk: int = PIN_CHUNK, smallest: int = PIN_MIN) -> list[int]:
    """Power-of-two block sizes covering `total` bytes with less than `smallest` to spare.

    CUDA's caching host allocator rounds every request up to a power of two: one 22.4 GiB block
    would page-lock 32 GiB. Blocks that are powers of two already are taken at their size.
    """
    sizes = [chunk] * (total // chunk)
    rest = total % chunk
    size = chunk // 2
    while rest > 0:
        if rest >= size or size == smallest:
            sizes.append(size)
            rest -= size
        else:
            size //= 2
    return sizes


def _pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class RamStore:
    """Every expert packed once into host memory [L * E * nbytes]: one block, or (pinned) power-of-two
    blocks laid end to end, an expert that straddles two blocks being two pieces."""

    def __init__(self, source: ExpertStore, pin: bool = False, pinner: Callable[[int], torch.Tensor] = _pinned,
                 chunk: int = PIN_CHUNK):
        self.layout, self.num_layers, self.num_experts = source.layout, source.num_layers, source.num_experts
        total = self.num_layers * self.num_experts * self.layout.nbytes
        blocks = self._pin(total, pinner, chunk) if pin else None
        self.pinned = blocks is not None  # False also when pinning failed: loads then go through staging
        self.blocks = blocks or [torch.empty(total, dtype=torch.uint8)]
        for b in self.blocks:
            b.zero_()  # zeros, not empty: padding between aligned tensors is deterministic
        self._starts = [0]
        for b in self.blocks:
            self._starts.append(self._starts[-1] + b.numel())
        self.host_bytes = self._starts[-1]
        for layer in range(self.num_layers):
            for e in range(self.num_experts):
                dst = self.pieces(layer, e)
                for p in source.pieces(layer, e):
                    _scatter(dst, p)
                source.release(layer, e)  # one expert at a time: never two copies of all experts

    def _pin(self, total: int, pinner, chunk: int) -> list[torch.Tensor] | None:
        """Page-locked blocks, or None (with a warning) when the system refuses them."""
        blocks = []
        try:
            for size in pin_chunks(total, chunk, min(chunk, PIN_MIN)):
                blocks.append(pinner(size))
        except RuntimeError as e:
            del blocks
            if hasattr(torch._C, "_host_emptyCache"):  # hand the blocks pinned so far back to the system
                torch._C._host_emptyCache()
            warnings.warn(f"could not page-lock {total / (1 << 30):.2f} GiB for the expert store ({e}); "
                          "experts stay in pageable memory and are copied through staging buffers (slower "
                          "loads). Free RAM, use --store mmap, or raise the locked-memory limit.", stacklevel=3)
            return None
        return blocks

    def pieces(self, layer: int, expert: int) -> list[Piece]:
        """The expert's bytes: one piece, or two where it straddles blocks."""
        n = self.layout.nbytes
        lo = (layer * self.num_experts + expert) * n
        hi, out = lo + n, []
        i = bisect.bisect_right(self._starts, lo) - 1
        while lo < hi:
            start, block = self._starts[i], self.blocks[i]
            end = min(hi, start + block.numel())
            out.append(Piece(block[lo - start : end - start], lo - (layer * self.num_experts + expert) * n))
            lo, i = end, i + 1
        return out

    def release(self, layer: int, expert: int) -> None:
        pass


def _scatter(dst: list[Piece], src: Piece) -> None:
    """Copy the source piece into whichever destination pieces its byte range covers."""
    lo, hi = src.offset, src.offset + src.src.numel()
    for d in dst:
        a, b = max(lo, d.offset), min(hi, d.offset + d.src.numel())
        if a < b:
            d.src[a - d.offset : b - d.offset].copy_(src.src[a - lo : b - lo])
