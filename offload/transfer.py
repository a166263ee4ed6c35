"""Host -> device copies of packed experts, behind one small interface.

    transfer.load(pieces, dst, key, pinned)   # start filling slot `key` (dst) from host pieces
    transfer.wait(key)                        # compute may not read slot `key` before this
    transfer.release(key)                     # compute has finished reading slot `key`

CpuTransfer: plain synchronous copies; wait/release are no-ops; stall = the copy time.
CudaTransfer: a dedicated copy stream. Pinned sources (the RAM store) are copied
asynchronously straight from their buffer; pageable sources (mmapped files) are first
memcpy'd, by a copy thread, into one of three pinned staging buffers (allocated on the first
such load), so the compute thread never waits on a memcpy out of the file. Per-slot
events: `ready[key]` (copy done; the compute stream waits on it, so compute waits only for the
expert it needs) and `free[key]` (compute's last read; the copy stream waits on it before
overwriting the slot). No synchronize() per expert, no empty_cache(); stall is the compute
stream's measured wait after a load (read from timing events without blocking until stats are
asked for) plus the compute thread's waits for the copy thread; the copy thread's own time is
`host_copy_s`.
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

    def load(self, pieces: list[Piece], dst: torch.Tensor, key: int, pinned: bool, done=None) -> None: ...
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

    def load(self, pieces: list[Piece], dst: torch.Tensor, key: int, pinned: bool, done=None) -> None:
        t0 = time.perf_counter()
        self.bytes_copied += _copy_pieces(pieces, dst)
        self._stall += time.perf_counter() - t0
        if done is not None:
            done()

    def load_converting(self, pieces: list[Piece], key: int, pinned: bool, codec, slot_views: dict,
                        layout: Layout, done=None) -> None:
        """A load that converts as it copies (the codec's `fill` writes the slot); layout.nbytes are moved."""
        t0 = time.perf_counter()
        codec.fill(pieces, slot_views)
        self.bytes_copied += layout.nbytes
        self._stall += time.perf_counter() - t0
        if done is not None:
            done()

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
        self._jobs: dict[int, object] = {}  # slot -> its pageable load, queued on the copy thread
        self._waiter: dict[int, object] = {}  # slot -> the stream that waited on its last load
        self.bytes_copied = 0
        self._stall = 0.0
        self.host_copy_s = 0.0  # copy-thread time on pageable loads: memcpy out of the file + staging waits
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
    def load(self, pieces: list[Piece], dst: torch.Tensor, key: int, pinned: bool, done=None) -> None:
        """Start filling slot `key`; done() runs once the host pieces have been read (e.g. to drop mapped pages)."""
        def job():
            with self.cuda.stream(self.stream):
                self._await_free(key)
                self._to_device(pieces, dst, pinned)
                self._mark_ready(key)
        self._start(key, pinned, job, done, pieces)

    def _start(self, key: int, pinned: bool, job, done, pieces: list[Piece]) -> None:
        """Pinned sources are enqueued here and now; pageable ones go to the copy thread, which memcpys out
        of the file into the staging ring while this thread computes (wait() joins the job first)."""
        self._pending.add(key)
        self.bytes_copied += sum(p.src.numel() for p in pieces)  # counted here: stats never race the thread
        if pinned:
            job()
            if done is not None:
                done()
            return

        inference = torch.is_inference_mode_enabled()  # thread-local: the copy thread takes the caller's

        def run():
            with torch.inference_mode(inference):  # slots made under inference mode may only be written in it
                job()
            if done is not None:
                done()
        self._jobs[key] = self.cuda.submit(run)  # one worker, FIFO: a later job of the slot implies this one

    def _to_device(self, pieces: list[Piece], dst: torch.Tensor, pinned: bool) -> None:
        """Enqueue host pieces -> dst on the copy stream (the caller has entered it)."""
        if pinned:
            _copy_pieces(pieces, dst, non_blocking=True)
            return
        i = self._next
        self._next = (i + 1) % self.STAGING
        t0 = time.perf_counter()
        if i == len(self.staging):
            self.staging.append(self.cuda.pin(self.nbytes))
        self._claim_staging(i)
        buf = self.staging[i][: dst.numel()]
        _copy_pieces(pieces, buf)  # CPU memcpy out of the mapped file
        self.host_copy_s += time.perf_counter() - t0
        dst.copy_(buf, non_blocking=True)
        self._mark_staged(i)

    def load_converting(self, pieces: list[Piece], key: int, pinned: bool, codec, slot_views: dict,
                        layout: Layout, done=None) -> None:
        """Copy the stored bytes into one device staging buffer, then convert them into the slot's
        kernel layout (`codec.convert`), both on the copy stream: the bus carries the packed bytes."""
        def job():
            with self.cuda.stream(self.stream):
                if self._device_staging is None:  # allocated on the copy stream: only it uses the buffer
                    self._device_staging = self.cuda.device_empty(layout.nbytes, self.device)
                buf = self._device_staging
                self._await_free(key)
                self._to_device(pieces, buf, pinned)
                codec.convert(views(buf, layout), slot_views)  # stream order: buf is reused only after this
                self._mark_ready(key)
        self._start(key, pinned, job, done, pieces)

    # -- compute side --------------------------------------------------------------------------
    def wait(self, key: int) -> None:
        job = self._jobs.pop(key, None)
        if job is not None:  # the copy thread must have enqueued the copy before compute can wait on it
            t0 = time.perf_counter()
            self._join(job)
            self._stall += time.perf_counter() - t0
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

    def _join(self, job) -> None:
        job.result()

    def close(self) -> None:
        """Wait for every copy in flight (an engine being dropped)."""
        for job in list(self._jobs.values()):
            self._join(job)
        self._jobs.clear()
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
        """Compute's measured waits for copies plus this thread's waits for the copy thread."""
        self._fold(block=True)
        return self._stall


def make_transfer(device: torch.device | str, num_slots: int, nbytes: int) -> Transfer:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"offloading supports devices cpu and cuda, not {device.type!r}")
    backend = backend_for(device)
    return CpuTransfer() if backend is None else CudaTransfer(device, num_slots, nbytes, backend)
