"""Host -> device copies of packed experts, behind one small interface.

    transfer.load(pieces, dst, key, pinned)   # start filling slot `key` (dst) from host pieces
    transfer.wait(key)                        # compute may not read slot `key` before this
    transfer.release(key)                     # compute has finished reading slot `key`

CpuTransfer: plain synchronous copies; wait/release are no-ops; stall = the copy time.
CudaTransfer: a dedicated copy stream. Pinned sources (the RAM store) are copied
asynchronously straight from their buffer; pageable sources (mmapped files) are first
memcpy'd into one of three pinned staging buffers (allocated on the first such load). Per-slot
events: `ready[key]` (copy done; the compute stream waits on it, so compute waits only for the
expert it needs) and `free[key]` (compute's last read; the copy stream waits on it before
overwriting the slot). No synchronize() per expert, no empty_cache(); stall is the compute
stream's measured wait after a load (read from timing events without blocking until stats are
asked for) plus the host's time memcpying pageable sources and waiting for staging buffers.
CUDA itself is reached through a backend object (offload/streams.py), so a fake one can check
the ordering on a machine without a GPU.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from offload.packing import Layout, views
from offload.store import Piece
from offload.streams import TorchCuda, backend_for


class Transfer(Protocol):
    bytes_copied: int

    def load(self, pieces: list[Piece], dst: torch.Tensor, key: int, pinned: bool) -> None: ...
    def wait(self, key: int) -> None: ...
    def release(self, key: int) -> None: ...
    def stall_seconds(self) -> float: ...
    def adopt(self, tensor: torch.Tensor) -> None: ...
    def close(self) -> None: ...


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

    def adopt(self, tensor: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class CudaTransfer:
    """Copy stream + per-slot events + pinned staging for pageable sources.

    Each ordering step is one small method, so a test can remove or move it (tests/test_stream_order.py
    shows the fake backend catching every such mutant).
    """

    FOLD_EVERY = 256  # fold finished timing pairs into the stall total this often
    STAGING = 3  # pinned staging buffers: the host fills one while two copies are in flight

    def __init__(self, device: torch.device, num_slots: int, nbytes: int, backend=None):
        self.device, self.nbytes = device, nbytes
        self.cuda = backend or TorchCuda()
        self.stream = self.cuda.Stream(device)
        self.ready = [self.cuda.Event() for _ in range(num_slots)]
        self.free = [self.cuda.Event() for _ in range(num_slots)]
        self.staging: list[torch.Tensor] = []  # pinned on the first pageable load, not before
        self.staged = [self.cuda.Event() for _ in range(self.STAGING)]
        self._next = 0
        self._device_staging: torch.Tensor | None = None
        self._pending: set[int] = set()  # slots loaded since compute last waited on them
        self._waiter: dict[int, object] = {}  # slot -> the stream that waited on its last load
        self.bytes_copied = 0
        self._stall = 0.0
        self._host_s = 0.0  # host time spent on pageable loads: memcpy out of the file + staging waits
        self._timing: list[tuple] = []
        self._spare: list[tuple] = []

    # -- the ordering steps --------------------------------------------------------------------
    def _await_free(self, key: int) -> None:
        self.stream.wait_event(self.free[key])  # the slot's previous expert is no longer read

    def _mark_ready(self, key: int) -> None:
        self.ready[key].record(self.stream)

    def _await_ready(self, compute, key: int) -> None:
        compute.wait_event(self.ready[key])

    def _mark_free(self, compute, key: int) -> None:
        self.free[key].record(compute)

    def _claim_staging(self, i: int) -> None:
        self.staged[i].synchronize()  # host waits only if this staging buffer is still in flight

    def _mark_staged(self, i: int) -> None:
        self.staged[i].record(self.stream)

    # -- loads ---------------------------------------------------------------------------------
    def load(self, pieces: list[Piece], dst: torch.Tensor, key: int, pinned: bool) -> None:
        with self.cuda.stream(self.stream):
            self._await_free(key)
            self._to_device(pieces, dst, pinned)
            self._mark_ready(key)
        self._pending.add(key)

    def _to_device(self, pieces: list[Piece], dst: torch.Tensor, pinned: bool) -> None:
        """Enqueue host pieces -> dst on the copy stream (the caller has entered it)."""
        if pinned:
            self.bytes_copied += _copy_pieces(pieces, dst, non_blocking=True)
            return
        i = self._next
        self._next = (i + 1) % self.STAGING
        t0 = time.perf_counter()
        if i == len(self.staging):
            self.staging.append(self.cuda.pin(self.nbytes))
        self._claim_staging(i)
        buf = self.staging[i][: dst.numel()]
        self.bytes_copied += _copy_pieces(pieces, buf)  # CPU memcpy out of the mapped file
        self._host_s += time.perf_counter() - t0
        dst.copy_(buf, non_blocking=True)
        self._mark_staged(i)

    def load_converting(self, pieces: list[Piece], key: int, pinned: bool, codec, slot_views: dict,
                        layout: Layout) -> None:
        """Copy the stored bytes into one device staging buffer, then convert them into the slot's
        kernel layout (`codec.convert`), both on the copy stream: the bus carries the packed bytes."""
        with self.cuda.stream(self.stream):
            if self._device_staging is None:  # allocated on the copy stream: only it ever uses the buffer
                self._device_staging = self.cuda.device_empty(layout.nbytes, self.device)
            buf = self._device_staging
            self._await_free(key)
            self._to_device(pieces, buf, pinned)
            codec.convert(views(buf, layout), slot_views)  # stream order: buf is reused only after this
            self._mark_ready(key)
        self._pending.add(key)

    # -- compute side --------------------------------------------------------------------------
    def wait(self, key: int) -> None:
        compute = self.cuda.current_stream(self.device)
        if key not in self._pending:  # compute already waited on this copy: stream order suffices
            if self._waiter.get(key) != compute:
                self._await_ready(compute, key)
                self._waiter[key] = compute
            return
        self._pending.discard(key)
        self._waiter[key] = compute
        start, end = self._spare.pop() if self._spare else (self.cuda.Event(True), self.cuda.Event(True))
        start.record(compute)  # timed only after a load: a hit on a settled slot costs no timing events
        self._await_ready(compute, key)
        end.record(compute)
        self._timing.append((start, end))
        if len(self._timing) >= self.FOLD_EVERY:
            self._fold(block=False)

    def release(self, key: int) -> None:
        self._mark_free(self.cuda.current_stream(self.device), key)

    def adopt(self, tensor: torch.Tensor) -> None:
        """`tensor` (the slot pool) is written by the copy stream: its memory must not be handed to
        another allocation before the copies enqueued so far have landed."""
        self.cuda.record_stream(tensor, self.stream)

    def close(self) -> None:
        """Wait for every copy in flight (an engine being dropped)."""
        self.stream.synchronize()

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
        """Compute's measured waits for copies plus the host's time on pageable loads."""
        self._fold(block=True)
        return self._stall + self._host_s


def make_transfer(device: torch.device | str, num_slots: int, nbytes: int) -> Transfer:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"offloading supports devices cpu and cuda, not {device.type!r}")
    backend = backend_for(device)
    return CpuTransfer() if backend is None else CudaTransfer(device, num_slots, nbytes, backend)
