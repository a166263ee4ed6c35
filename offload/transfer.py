"""Host -> device copies of packed experts, behind one small interface.

    transfer.load(pieces, dst, key, pinned)   # start filling slot `key` (dst) from host pieces
    transfer.wait(key)                        # compute may not read slot `key` before this
    transfer.release(key)                     # compute has finished reading slot `key`

CpuTransfer: plain synchronous copies; wait/release are no-ops; stall = the copy time.
CudaTransfer: a dedicated copy stream. Pinned sources (the RAM store) are copied
asynchronously straight from their buffer; pageable sources (mmapped files) are first
memcpy'd into one of a few pinned staging buffers. Per-slot events: `ready[key]` (copy
done; the compute stream waits on it, so compute waits only for the expert it needs) and
`free[key]` (compute's last read; the copy stream waits on it before overwriting the
slot). No synchronize() per expert, no empty_cache(); stall is the compute stream's
measured wait, read from timing events without blocking until stats are asked for.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from offload.packing import Layout, views
from offload.store import Piece


class Transfer(Protocol):
    bytes_copied: int

    def load(self, pieces: list[Piece], dst: torch.Tensor, key: int, pinned: bool) -> None: ...
    def wait(self, key: int) -> None: ...
    def release(self, key: int) -> None: ...
    def stall_seconds(self) -> float: ...


def _copy_pieces(pieces: list[Piece], dst: torch.Tensor, non_blocking: bool = False) -> int:
    n = 0
    for p in pieces:
        size = p.src.numel()
        dst[p.offset : p.offset + size].copy_(p.src, non_blocking=non_blocking)
        n += size
    return n


class CpuTransfer:
    """The "device" is host memory: a load is a memcpy, done when load() returns."""

    def __init__(self) -> None:
        self.bytes_copied = 0
        self._stall = 0.0

    def load(self, pieces: list[Piece], dst: torch.Tensor, key: int, pinned: bool) -> None:
        t0 = time.perf_counter()
        self.bytes_copied += _copy_pieces(pieces, dst)
        self._stall += time.perf_counter() - t0

    def load_converting(self, pieces: list[Piece], key: int, pinned: bool, codec, slot_views: dict,
                        layout: Layout) -> None:
        """A load that converts as it copies (the codec's `fill` writes the slot); layout.nbytes are moved."""
        t0 = time.perf_counter()
        codec.fill(pieces, slot_views)
        self.bytes_copied += layout.nbytes
        self._stall += time.perf_counter() - t0

    def wait(self, key: int) -> None:
        pass

    def release(self, key: int) -> None:
        pass

    def stall_seconds(self) -> float:
        return self._stall


class CudaTransfer:
    """Copy stream + per-slot events + pinned staging for pageable sources."""

    FOLD_EVERY = 256  # fold finished timing pairs into the stall total this often

    def __init__(self, device: torch.device, num_slots: int, nbytes: int, staging: int = 2):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.ready = [torch.cuda.Event() for _ in range(num_slots)]
        self.free = [torch.cuda.Event() for _ in range(num_slots)]
        self.staging = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(staging)]
        self.staged = [torch.cuda.Event() for _ in range(staging)]
        self._next = 0
        self._device_staging: torch.Tensor | None = None
        self.bytes_copied = 0
        self._stall = 0.0
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._spare: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def load(self, pieces: list[Piece], dst: torch.Tensor, key: int, pinned: bool) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[key])  # the slot's previous expert is no longer read
            self._to_device(pieces, dst, pinned)
            self.ready[key].record(self.stream)

    def _to_device(self, pieces: list[Piece], dst: torch.Tensor, pinned: bool) -> None:
        """Enqueue host pieces -> dst on the copy stream (the caller has entered it)."""
        if pinned:
            self.bytes_copied += _copy_pieces(pieces, dst, non_blocking=True)
            return
        i = self._next
        self._next = (i + 1) % len(self.staging)
        self.staged[i].synchronize()  # host waits only if this staging buffer is still in flight
        buf = self.staging[i][: dst.numel()]
        self.bytes_copied += _copy_pieces(pieces, buf)  # CPU memcpy out of the mapped file
        dst.copy_(buf, non_blocking=True)
        self.staged[i].record(self.stream)

    def load_converting(self, pieces: list[Piece], key: int, pinned: bool, codec, slot_views: dict,
                        layout: Layout) -> None:
        """Copy the stored bytes into one device staging buffer, then convert them into the slot's
        kernel layout (`codec.convert`), both on the copy stream: the bus carries the packed bytes."""
        if self._device_staging is None:  # allocated on the first converting load, reused after
            self._device_staging = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        buf = self._device_staging
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[key])
            self._to_device(pieces, buf, pinned)
            codec.convert(views(buf, layout), slot_views)  # stream order: buf is reused only after this
            self.ready[key].record(self.stream)

    def wait(self, key: int) -> None:
        compute = torch.cuda.current_stream(self.device)
        start, end = self._spare.pop() if self._spare else (
            torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        start.record(compute)
        compute.wait_event(self.ready[key])
        end.record(compute)
        self._timing.append((start, end))
        if len(self._timing) >= self.FOLD_EVERY:
            self._fold(block=False)

    def release(self, key: int) -> None:
        self.free[key].record(torch.cuda.current_stream(self.device))

    def _fold(self, block: bool) -> None:
        keep = []
        for start, end in self._timing:
            if block:
                end.synchronize()
            if end.query():
                self._stall += start.elapsed_time(end) / 1000.0
                self._spare.append((start, end))
            else:
                keep.append((start, end))
        self._timing = keep

    def stall_seconds(self) -> float:
        self._fold(block=True)
        return self._stall


def make_transfer(device: torch.device | str, num_slots: int, nbytes: int) -> Transfer:
    device = torch.device(device)
    if device.type == "cuda":
        return CudaTransfer(device, num_slots, nbytes)
    if device.type != "cpu":
        raise ValueError(f"offloading supports devices cpu and cuda, not {device.type!r}")
    return CpuTransfer()
