"""The bytes a layer's host experts need from the device and send back, through the transfer's backend.

A layer that runs misses on the host (offload/host_experts.py) moves two small things across the bus:
its input rows (one per token, device -> host) and the experts' results (host -> device). Both go
through pinned buffers allocated once and grown with the largest step seen, never per step:

    stage(x)      copy x into the pinned rows on the compute stream and record `rows_copied`; the caller
                  does this before its host sync for the ids, so that one sync covers both
    rows(staged)  wait for `rows_copied` (on a GPU that sync has passed it), then the host reads them
    send(ys)      write the results into one pinned block, one copy of it into a device block on the
                  compute stream; returns each result's view of the device block. The block is free to
                  rewrite without an event of its own: a layer sends only after rows() has waited for its
                  rows, and their copy was queued behind the previous layer's copy out of the block

The backend is offload/streams.py's seam (torch.cuda, or tests/fake_cuda.py, which checks that every
read of these buffers is ordered after its write and every rewrite after its reads).
"""

from __future__ import annotations

import torch


class HostCrossing:
    def __init__(self, backend, device: torch.device):
        self.cuda, self.device = backend, device
        self._rows = self._block = self._device_block = None  # uint8, grown
        self.rows_copied = backend.Event()

    def _grown(self, buf: torch.Tensor | None, nbytes: int, on_device: bool) -> torch.Tensor:
        if buf is not None and buf.numel() >= nbytes:
            return buf
        return self.cuda.device_empty(nbytes, self.device) if on_device else self.cuda.pin(nbytes)

    def stage(self, x: torch.Tensor) -> torch.Tensor:
        """Start the device -> host copy of the layer input; returns its pinned host view."""
        nbytes = x.numel() * x.element_size()
        self._rows = self._grown(self._rows, nbytes, on_device=False)
        staged = self._rows[:nbytes].view(x.dtype).view(x.shape)
        self.cuda.copy(staged, x)
        self.rows_copied.record(self.cuda.current_stream(self.device))
        return staged

    def rows(self, staged: torch.Tensor) -> torch.Tensor:
        self.rows_copied.synchronize()
        return staged

    def send(self, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host results -> their views of one device block, filled by one async copy."""
        dtype, width = ys[0].dtype, ys[0].shape[1]
        rows = sum(y.shape[0] for y in ys)
        nbytes = rows * width * ys[0].element_size()
        self._block = self._grown(self._block, nbytes, on_device=False)
        self._device_block = self._grown(self._device_block, nbytes, on_device=True)
        block = self._block[:nbytes].view(dtype).view(rows, width)
        torch.cat(ys, out=block)
        out = self._device_block[:nbytes].view(dtype).view(rows, width)
        self.cuda.copy(out, block)
        return list(out.split([y.shape[0] for y in ys]))
