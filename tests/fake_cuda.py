"""A fake CUDA backend for CudaTransfer (offload/streams.py's seam) that checks stream ordering on the CPU.

Everything runs eagerly on the CPU, so the numbers are always right; what the fake checks is
whether they would be on a GPU. Each actor (the host and every stream) keeps a vector clock:

    an op enqueued on stream S        S.clock = S.clock | host.clock; S ticks
    a host op (CPU memcpy)            host ticks
    event.record(S)                   event.clock = S.clock
    S.wait_event(e)                   S.clock |= e.clock
    e.synchronize(), S.synchronize()  host.clock |= e.clock (S.clock)
    submit(job) ... job.result()      the copy thread starts after the submitter; the waiter learns its end
The copy thread is a second host actor; its jobs run as late as they can (when a result is asked
for), so a missing join shows up as a stale slot.

Every aten op is seen through a TorchDispatchMode and attributed to the current stream when it
touches a device buffer or runs inside `copy` (the backend's async copy), to the host otherwise.
Tracked buffers are the ones CudaTransfer and HostCrossing get from the backend: pinned staging
(`pin`, host), device staging (`device_empty`) and the slot pool (`record_stream`, one granule per
row of its last dimension, i.e. per slot). At each access:
  - a granule is read only after its last write (a slot is read only after its last copy);
  - a granule is written only after its last write and every read since (a slot is overwritten only
    after its last reader; writes on two streams are ordered; a staging buffer is refilled only
    after every copy out of it has finished);
  - a device buffer freed while a stream it was not recorded on may still write it is reported
    when `checking()` ends (the pool handed to the next allocation under a landing prefetch).
Host syncs that a real GPU would add (`.tolist()` of device ids) are deliberately not modelled:
the events alone must order everything, so the checker is stricter than the hardware.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST = "host"  # the thread that computes
COPIER = "copier"  # the transfer's copy thread (submit)


class OrderViolation(AssertionError):
    """An access a GPU could run before (or concurrently with) one it depends on."""


def join(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        if v > out.get(k, 0):
            out[k] = v
    return out


class FakeStream:
    def __init__(self, fake: FakeCuda, name: str):
        self.fake, self.name, self.clock = fake, name, {name: 0}

    def enqueue(self) -> tuple[str, int]:
        """One op on this stream: after everything the host did before enqueueing it."""
        self.clock = join(self.clock, self.fake.host)
        self.clock[self.name] += 1
        return self.name, self.clock[self.name]

    def wait_event(self, event: FakeEvent) -> None:
        self.clock = join(join(self.clock, self.fake.host), event.clock)

    def synchronize(self) -> None:
        self.fake.host = join(self.fake.host, self.clock)

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class FakeEvent:
    def __init__(self, fake: FakeCuda):
        self.fake, self.clock = fake, {}

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.fake.current
        self.clock = join(stream.clock, self.fake.host)

    def synchronize(self) -> None:
        self.fake.host = join(self.fake.host, self.clock)

    def query(self) -> bool:
        return True  # timing only: a query never orders anything here

    def elapsed_time(self, other: FakeEvent) -> float:
        return 0.0


class FakeJob:
    def __init__(self, fake: FakeCuda, fn, start: dict[str, int]):
        self.fake, self.fn, self.start, self.end, self.done = fake, fn, start, {}, False

    def result(self) -> None:
        while not self.done:
            self.fake._run_next()
        self.fake.host = join(self.fake.host, self.end)  # the waiting thread now knows what the job did


@dataclass
class Granule:
    write: tuple[str, int, str] | None = None  # (actor, tick, what)
    reads: dict[str, tuple[int, str]] = field(default_factory=dict)  # actor -> (tick, what), since the write


@dataclass
class Region:
    name: str
    device: bool
    granule: int
    granules: list[Granule]
    home: str  # the stream it was allocated on
    recorded: set[str] = field(default_factory=set)


class FakeCuda:
    """The backend (see offload/streams.py) plus the checker; `with fake.checking():` turns checks on."""

    def __init__(self):
        self.clocks: dict[str, dict[str, int]] = {HOST: {HOST: 0}}  # per host thread
        self._actor = HOST  # the host thread running now
        self._queue: list[FakeJob] = []
        self.default = FakeStream(self, "compute")
        self._stack = [self.default]
        self.streams = {self.default.name: self.default}
        self.regions: dict[int, Region] = {}  # storage data_ptr -> region
        self.late: list[str] = []  # violations found when a buffer was freed
        self.accesses = 0  # checked accesses (a test can assert the checker saw something)
        self._queued = False  # inside copy(): the op runs on the current stream

    # -- the backend -----------------------------------------------------------------------
    @property
    def host(self) -> dict[str, int]:
        """The clock of the host thread running now."""
        return self.clocks[self._actor]

    @host.setter
    def host(self, clock: dict[str, int]) -> None:
        self.clocks[self._actor] = clock

    def submit(self, fn) -> FakeJob:
        """The copy thread, at its laziest: a job runs only when its result (or a later one's) is asked for."""
        job = FakeJob(self, fn, dict(self.host))
        self._queue.append(job)
        return job

    def _run_next(self) -> None:
        job, prev = self._queue.pop(0), self._actor
        self._actor = COPIER
        self.host = join(self.clocks.get(COPIER, {COPIER: 0}), job.start)  # after what the submitter did
        try:
            job.fn()
        finally:
            job.end, job.done, self._actor = dict(self.host), True, prev

    @property
    def current(self) -> FakeStream:
        return self._stack[-1]

    def Stream(self, device) -> FakeStream:  # noqa: N802
        s = FakeStream(self, f"copy{len(self.streams)}")
        self.streams[s.name] = s
        return s

    def Event(self, timing: bool = False) -> FakeEvent:  # noqa: N802
        return FakeEvent(self)

    @contextmanager
    def stream(self, s: FakeStream):
        self._stack.append(s)
        try:
            yield
        finally:
            self._stack.pop()

    def current_stream(self, device) -> FakeStream:
        return self.current

    def pin(self, nbytes: int) -> torch.Tensor:
        t = torch.zeros(nbytes, dtype=torch.uint8)
        self._track(t, f"staging{len(self.regions)}", device=False, granule=nbytes)
        return t

    def device_empty(self, nbytes: int, device) -> torch.Tensor:
        t = torch.empty(nbytes, dtype=torch.uint8)
        self._track(t, f"device-staging{len(self.regions)}", device=True, granule=nbytes)
        return t

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A copy queued on the current stream, even when no tracked buffer on its either side is a device one
        (a device -> pinned host copy of activations: the activations are not tracked)."""
        self._queued = True
        try:
            dst.copy_(src)
        finally:
            self._queued = False

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        region = self.regions.get(tensor.untyped_storage().data_ptr())
        if region is None:
            region = self.track(tensor)
        region.recorded.add(stream.name)

    def track(self, tensor: torch.Tensor) -> Region:
        """Check accesses to `tensor` (a slot pool allocated on the current stream), one granule per row."""
        return self._track(tensor, f"pool{len(self.regions)}", device=True,
                           granule=tensor.shape[-1] * tensor.element_size())

    def _track(self, t: torch.Tensor, name: str, device: bool, granule: int) -> Region:
        nbytes = t.untyped_storage().nbytes()
        region = Region(name, device, granule, [Granule() for _ in range(-(-nbytes // granule))], self.current.name)
        ptr = t.untyped_storage().data_ptr()
        self.regions[ptr] = region
        weakref.finalize(t, self._freed, ptr, region)
        return region

    # -- the checks --------------------------------------------------------------------------
    def _freed(self, ptr: int, region: Region) -> None:
        if self.regions.get(ptr) is region:
            del self.regions[ptr]
        for i, g in enumerate(region.granules):
            if g.write is None:
                continue
            actor, tick, what = g.write
            if actor not in region.recorded | {region.home, *self.clocks} and self.host.get(actor, 0) < tick:
                self.late.append(f"{region.name}[{i}] freed while {what} on {actor} may still be landing "
                                 f"(not record_stream'd on {actor}, never waited for)")

    def access(self, region: Region, lo: int, hi: int, write: bool, actor: str, tick: int, what: str) -> None:
        clock = self.clocks[actor] if actor in self.clocks else self.streams[actor].clock
        for i in range(lo // region.granule, (hi - 1) // region.granule + 1):
            g = region.granules[i]
            self.accesses += 1
            if g.write is not None and clock.get(g.write[0], 0) < g.write[1]:
                raise OrderViolation(f"{region.name}[{i}]: {what} on {actor} ({'write' if write else 'read'}) "
                                     f"is not ordered after {g.write[2]} on {g.write[0]} (write)")
            if write:
                for reader, (rtick, rwhat) in g.reads.items():
                    if clock.get(reader, 0) < rtick:
                        raise OrderViolation(f"{region.name}[{i}]: {what} on {actor} (write) is not ordered "
                                             f"after {rwhat} on {reader} (read)")
                g.write, g.reads = (actor, tick, what), {}
            else:
                g.reads[actor] = (tick, what)

    @contextmanager
    def checking(self):
        """Check every tensor op inside the block; raise what was found at free time on the way out."""
        with _Mode(self):
            yield self
        if self.late:
            raise OrderViolation("; ".join(self.late))


def _byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    if t.numel() == 0:
        return None
    item = t.element_size()
    start = t.storage_offset() * item
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True)) + 1
    return start, start + span * item


def _tensor_args(func, args, kwargs):
    """(tensor, is_write) for each tensor argument that the op reads or writes (views are neither)."""
    out = []
    schema = func._schema.arguments
    given = list(zip(schema, args, strict=False)) + [(a, kwargs[a.name]) for a in schema if a.name in kwargs]
    for arg, value in given:
        info = arg.alias_info
        if info is not None and not info.is_write:
            continue  # a view: no data is touched
        tensors = value if isinstance(value, (list, tuple)) else [value]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                out.append((t, info is not None and info.is_write))
    return out


class _Mode(TorchDispatchMode):
    def __init__(self, fake: FakeCuda):
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fake = self.fake
        touched = []
        for t, write in _tensor_args(func, args, kwargs):
            if t.device.type != "cpu" or t.is_meta:
                continue
            region = fake.regions.get(t.untyped_storage().data_ptr())
            span = _byte_range(t) if region is not None else None
            if span is not None:
                touched.append((region, span, write))
        if touched:
            on_device = fake._queued or any(r.device for r, _, _ in touched)
            what = func.__name__
            if on_device:
                actor, tick = fake.current.enqueue()
            else:
                actor = fake._actor
                fake.host[actor] = tick = fake.host.get(actor, 0) + 1
            for region, (lo, hi), write in touched:
                fake.access(region, lo, hi, write, actor, tick, what)
        return func(*args, **kwargs)
