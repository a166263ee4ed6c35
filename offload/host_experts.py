"""Missed experts computed on the host, straight from the host store, instead of copied into a slot.

Only the activations cross the bus: the expert's packed bytes are converted into ONE host scratch slot
(allocated once, the host codec's `slot_layout`, via `codec.fill`) and the host codec's kernel runs on
the rows moved to the host. Experts stored in the host kernel's own layout (--prepack) are not copied:
the kernel reads the store's bytes (RAM or the mapped file) in place. On the CPU device the host codec
is the engine's own codec, so a CPU run performs exactly the operations a copy into a slot followed by a
compute performs: bitwise the same.
The expert is never admitted to the cache by this path.

`calibrate` measures the cost model's three figures once at start-up (offload/miss_policy.py). The host
figures are medians over experts that together hold more than twice the largest CPU cache, so each run reads
its expert from DRAM as a miss does. One expert re-read (what was timed before) is cache-resident wherever
the L3 holds it (a Mixtral-8x7B expert is 99 MB; server L3s hold 105-480 MB): a cache figure, not a miss's
cost (on the H200's host it gave cpu 1.64 ms/expert; a run's host experts took 5.7 ms each).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from offload.codec import for_layer, slot_layout
from offload.miss_policy import Costs
from offload.packing import views


class HostExperts:
    """One host scratch slot and the host codec's expert function."""

    def __init__(self, store, codec, expert_fn):
        held = slot_layout(codec)
        self.store, self.codec, self.expert_fn = store, codec, expert_fn
        self._buf = torch.empty(held.nbytes, dtype=torch.uint8)
        self._views = views(self._buf, held)
        self.in_place = held == store.layout  # the kernel reads the store

    def run(self, layer: int, expert: int, x_host: torch.Tensor) -> torch.Tensor:
        """expert(x_host) on the host; the store's pages for it are released once read."""
        pieces = self.store.pieces(layer, expert)
        p = pieces[0]
        if self.in_place and len(pieces) == 1 and p.offset == 0 and p.src.numel() >= self._buf.numel():
            y = self.expert_fn(x_host, *self.codec.decode(views(p.src[: self._buf.numel()], self.store.layout)))
        else:
            self._fill(pieces, layer)
            y = self.expert_fn(x_host, *self.codec.decode(self._views))
        self.store.release(layer, expert)
        return y

    def _fill(self, pieces, layer: int) -> None:
        """What a CPU load into a slot does: the codec's converting fill, or (slots of stored bytes) a copy."""
        codec = for_layer(self.codec, layer)
        if hasattr(codec, "fill"):
            codec.fill(pieces, self._views)
            return
        for p in pieces:
            self._buf[p.offset : p.offset + p.src.numel()].copy_(p.src)


def largest_cache_bytes() -> int | None:
    """The largest CPU cache (Linux sysfs: cpu0's last level), None where it cannot be read."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else None


def beyond_cache(host: HostExperts) -> list[tuple[int, int]]:
    """(layer, expert) pairs that together hold over twice the largest cache (all of them if the store is smaller):
    timed in turn, each run reads its expert from DRAM."""
    s = host.store
    need = math.ceil(2 * (largest_cache_bytes() or 0) / s.layout.nbytes) + 1
    return [(layer, e) for layer in range(s.num_layers) for e in range(s.num_experts)][: max(2, need)]


def _host_median(host: HostExperts, x: torch.Tensor, pairs: list[tuple[int, int]]) -> float:
    """Median seconds of host.run over `pairs`, after one untimed pass (pages in, kernels warm)."""
    for layer, e in pairs:
        host.run(layer, e, x)
    times = []
    for layer, e in pairs:
        t0 = time.perf_counter()
        host.run(layer, e, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _best_of(fn, n: int = 3, sync=lambda: None) -> float:
    best = float("inf")
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(host: HostExperts, engine_codec, device_fn, dim: int, dtype: torch.dtype,
              device: torch.device) -> Costs:
    """Seconds per expert: a pinned host -> device copy of one packed expert, one host-kernel expert
    (the configured threads; from DRAM, see the module docstring), alone and while copies stream (their
    DMA shares the host's DRAM), one device expert. On the CPU device the copy is the fill into a slot
    (and nothing runs beside it)."""
    x = torch.randn(1, dim, dtype=dtype)
    pairs = beyond_cache(host)
    cpu = _host_median(host, x, pairs)
    nbytes = host.store.layout.nbytes
    if device.type != "cuda":
        return Costs(copy=_best_of(lambda: host._fill(host.store.pieces(0, 0), 0)), cpu=cpu,
                     gpu=_best_of(lambda: host.expert_fn(x, *host.codec.decode(host._views))))
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copy = _best_of(lambda: dst.copy_(src, non_blocking=True), sync=sync)
    side = torch.cuda.Stream(device)

    def beside_copies(layer: int, e: int) -> float:  # copies queued to outlast the host run, timed while they stream
        with torch.cuda.stream(side):
            for _ in range(int(4 * cpu / copy) + 2):
                dst.copy_(src, non_blocking=True)
        t0 = time.perf_counter()  # the clock starts after the copies are queued and stops before any wait
        host.run(layer, e, x)
        seconds = time.perf_counter() - t0
        side.synchronize()
        return seconds
    beside = statistics.median(beside_copies(layer, e) for layer, e in pairs)
    for p in host.store.pieces(0, 0):  # a real expert: the device timing runs on real values
        src[p.offset : p.offset + p.src.numel()].copy_(p.src)
    host.store.release(0, 0)
    dst.copy_(src)
    held = slot_layout(engine_codec)
    if held != engine_codec.layout:  # the device slot holds the kernel's layout: convert once
        slot = torch.empty(held.nbytes, dtype=torch.uint8, device=device)
        for_layer(engine_codec, 0).convert(views(dst, engine_codec.layout), views(slot, held))
    else:
        slot = dst
    from_slot = views(slot, held)
    xd = x.to(device)
    gpu = _best_of(lambda: device_fn(xd, *engine_codec.decode(from_slot)), sync=sync)
    return Costs(copy=copy, cpu=cpu, gpu=gpu, cpu_beside_copy=beside)
