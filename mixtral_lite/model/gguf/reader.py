"""Read a GGUF file: its metadata, its tensor table, and each tensor's bytes in place through a memory map.

    GGUF (little-endian, versions 2 and 3):
      "GGUF"  version u32  tensor_count u64  kv_count u64
      kv_count x (key: string, value type u32, value)        string = u64 length + UTF-8 bytes
      tensor_count x (name: string, n_dims u32, dims u64 x n_dims (the row length first), type u32,
                      offset u64 from the data section)
      padding to general.alignment (32 unless the metadata says otherwise), then the data section

Nothing but the header is read at open: `raw(name)` is a uint8 view of the mapped file (rows of GGML
blocks, offload/ggml.py), so a 26 GB file costs no RAM until its pages are touched, and the page cache
holds what fits. Every problem raises GGUFError naming the file and the field or tensor.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offload.ggml import TYPES, BlockType, row_bytes, type_name
from offload.store import readonly_bytes

from ..checkpoint import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


class GGUFError(CheckpointError):
    """A GGUF file mixtral-lite cannot read; the message names the file and the field or tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # torch order: [..., rows, row length]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type(self) -> BlockType | None:
        return TYPES.get(self.type_id)

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)


class _Cursor:
    """Sequential little-endian reads from the mapped header; errors name the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: the header runs past the end of the file ({len(self.buf)} bytes): "
                            "truncated or not a GGUF file")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not UTF-8 text") from None

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == STRING:
            return self.string(f"field {key!r}")
        if vtype == ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _NUMPY:
                size = np.dtype(_NUMPY[etype]).itemsize
                return np.frombuffer(self.take(count * size), dtype=_NUMPY[etype]).copy()
            if etype == STRING:
                return [self.string(f"field {key!r}") for _ in range(count)]
            if etype == ARRAY:
                return [self.value(ARRAY, key) for _ in range(count)]
        raise GGUFError(f"{self.path}: field {key!r} has value type {vtype}, not one GGUF defines")


class GGUFFile:
    """The metadata (`fields`), tensor table (`tensors`) and mapped bytes of one GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                # read-only and shared: a private writable mapping of a file larger than RAM is refused by
                # the kernel's overcommit check (ENOMEM for a 26 GB GGUF on a 24 GB machine)
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise GGUFError(f"{self.path}: cannot be read ({e})") from None
        self.size = len(self._mm)
        cur = _Cursor(memoryview(self._mm), self.path)
        self.version = self._header(cur)
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > self.size or n_kv > self.size:
            raise GGUFError(f"{self.path}: header counts {n_tensors} tensors and {n_kv} fields: corrupt")
        self.fields: dict = {}
        for _ in range(n_kv):
            key = cur.string("a field name")
            self.fields[key] = cur.value(cur.scalar("<I"), key)
        align = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{self.path}: field 'general.alignment' must be a power of two, got {align!r}")
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        data = -(-cur.pos // align) * align
        self.tensors = {name: self._placed(name, t, dims, off, data) for name, dims, t, off in infos}
        self.bytes = readonly_bytes(self._mm)  # the whole file, uint8

    def _header(self, cur: _Cursor) -> int:
        magic = bytes(cur.take(4))
        if magic != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (starts with {magic!r}, not {MAGIC!r})")
        version = cur.scalar("<I")
        if version not in VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            what = "a big-endian GGUF" if swapped in VERSIONS else f"GGUF version {version}"
            raise GGUFError(f"{self.path}: {what}; mixtral-lite reads little-endian versions {VERSIONS}")
        return version

    def _tensor_info(self, cur: _Cursor):
        name = cur.string("a tensor name")
        n_dims = cur.scalar("<I")
        if n_dims > 8:
            raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions: corrupt tensor table")
        dims = tuple(cur.scalar("<Q") for _ in range(n_dims))
        return name, dims, cur.scalar("<I"), cur.scalar("<Q")

    def _placed(self, name: str, type_id: int, dims: tuple[int, ...], offset: int, data: int) -> TensorInfo:
        shape = tuple(reversed(dims))  # GGUF lists ne0 (the row) first
        t = TYPES.get(type_id)
        nbytes = 0
        if t is not None:
            if shape and shape[-1] % t.block:
                raise GGUFError(f"{self.path}: tensor {name!r} ({t.name}) has rows of {shape[-1]} weights, not a "
                                f"multiple of its block of {t.block}")
            rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
            nbytes = rows * row_bytes(t, shape[-1] if shape else 1)
            if data + offset + nbytes > self.size:
                raise GGUFError(f"{self.path}: tensor {name!r} ends at byte {data + offset + nbytes} but the file "
                                f"has {self.size} bytes (truncated download?)")
        return TensorInfo(name, type_id, shape, data + offset, nbytes)

    def field(self, key: str, kind: type | tuple = int, default=None):
        """A metadata value checked against `kind`; `default` when absent (None: required)."""
        if key not in self.fields:
            if default is None:
                raise GGUFError(f"{self.path}: field {key!r} is missing")
            return default
        value = self.fields[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok and kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise GGUFError(f"{self.path}: field {key!r} is {value!r}, expected {getattr(kind, '__name__', kind)}")
        return value

    def info(self, name: str) -> TensorInfo:
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        if t.type is None:
            raise GGUFError(f"{self.path}: tensor {name!r} has type {t.type_name}, which mixtral-lite does not "
                            f"read (it reads {', '.join(sorted(b.name for b in TYPES.values()))})")
        return t

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as uint8 [..., rows, row bytes], a view of the mapped file."""
        t = self.info(name)
        width = row_bytes(t.type, t.shape[-1])
        return self.bytes[t.offset : t.offset + t.nbytes].view(*t.shape[:-1], width)

    def release(self, start: int, nbytes: int) -> None:
        """Drop the pages of [start, start + nbytes) from this process (re-read from the page cache if needed)."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo, hi = start // page * page, min(-(-(start + nbytes) // page) * page, self.size)
        self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
