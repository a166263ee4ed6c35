"""What CudaTransfer asks of CUDA, behind one object: the seam a test backend replaces.

    backend.Stream(device) / backend.Event(timing)      streams and events
    backend.stream(s)                                   context: s is the current stream
    backend.current_stream(device)                      the stream compute is enqueued on
    backend.pin(nbytes)                                 page-locked host bytes (uint8)
    backend.device_empty(nbytes, device)                device bytes (uint8)
    backend.record_stream(tensor, stream)               tensor's memory is used by work on `stream`
    backend.copy(dst, src)                              dst.copy_(src) queued on the current stream (async)
    backend.submit(fn)                                  run fn on the copy thread (FIFO) -> job.result()

`TorchCuda` is torch.cuda itself. tests/fake_cuda.py provides one that runs everything on the
CPU and checks the happens-before order of every access to slots and staging buffers.
`use_backend(b)` makes every transfer built inside it use `b`, even for device "cpu": that is how
the engine, model and quantized-store tests run under the fake without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


class TorchCuda:
    """The real CUDA runtime, through torch.cuda, and one copy thread."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None

    def Stream(self, device: torch.device):  # noqa: N802  (mirrors torch.cuda.Stream)
        return torch.cuda.Stream(device)

    def Event(self, timing: bool = False):  # noqa: N802
        return torch.cuda.Event(enable_timing=timing)

    def stream(self, s):
        return torch.cuda.stream(s)

    def current_stream(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def pin(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def device_empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def submit(self, fn):
        """fn on the one copy thread (started on first use); torch's copies release the GIL."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="offload-copy")
        return self._pool.submit(fn)


_override: list = []


@contextmanager
def use_backend(backend) -> Iterator[None]:
    """Transfers made inside this block use `backend` (whatever their device)."""
    _override.append(backend)
    try:
        yield
    finally:
        _override.pop()


def backend_for(device: torch.device):
    """The backend a transfer to `device` uses: an override, CUDA's own, or None (plain CPU copies)."""
    if _override:
        return _override[-1]
    return TorchCuda() if device.type == "cuda" else None
