"""Crash-safe writing for tools/quantize_experts.py: a streamed safetensors file, the journal, progress.

A shard is written header first (every packed expert has the same size, so the header is known
up front), then each expert's bytes; `keep` reopens a partial shard for --resume. The journal
records each expert once its bytes are flushed; a line cut by a kill ends the readable part.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch


class StreamWriter:
    """A safetensors file written header first, then each tensor's bytes in header order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], keep: int = 0):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self.ends = []
        for name, tag, shape, nbytes in entries:
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self.ends.append(offset)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 64)  # data starts 64-byte aligned: views of it are aligned
        self.data_start, self.path = 8 + len(raw), path
        if keep == 0:
            self.f = open(path, "wb")
            self.f.write(struct.pack("<Q", len(raw)) + raw)
        else:  # resume: keep the header and the first `keep` tensors, drop whatever followed
            self.f = open(path, "r+b")
            self.f.truncate(self.data_start + self.ends[keep - 1])
            self.f.seek(0, os.SEEK_END)

    def read_back(self, index: int) -> bytes:
        start = self.data_start + (self.ends[index - 1] if index else 0)
        self.f.seek(start)
        data = self.f.read(self.data_start + self.ends[index] - start)
        self.f.seek(0, os.SEEK_END)
        return data

    def write(self, t: torch.Tensor) -> None:
        self.f.write(t.contiguous().view(torch.uint8).reshape(-1).numpy())

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def finish(self, final: Path) -> None:
        self.sync()
        self.f.close()
        os.replace(self.path, final)


class Progress:
    """One stderr line: done/total, percent, elapsed, ETA from this run's rate."""

    line_open = False  # a progress line without its newline is on stderr (an error must start a new line)

    def __init__(self, total: int, done: int, enabled: bool = True):
        self.total, self.start_done, self.t0, self.enabled = total, done, time.monotonic(), enabled

    def update(self, done: int, label: str) -> None:
        if not self.enabled:
            return
        dt = time.monotonic() - self.t0
        rate = (done - self.start_done) / dt if dt > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        fmt = lambda s: "?" if s != s else f"{int(s) // 60}:{int(s) % 60:02d}"  # noqa: E731
        end = "\n" if done == self.total else ""
        Progress.line_open = not end
        print(f"\rquantize: {done}/{self.total} experts ({100 * done / self.total:.0f}%) {label} "
              f"elapsed {fmt(dt)} ETA {fmt(eta)}   ", end=end, file=sys.stderr, flush=True)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_copy(src: Path, path: Path) -> None:
    """src's bytes at path, which appears only once they are all there."""
    tmp = path.with_name(path.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, path)


class Journal:
    def __init__(self, path: Path):
        self.path = path

    def start(self, head: dict) -> None:
        atomic_write(self.path, (json.dumps(head, sort_keys=True) + "\n").encode())

    def read(self) -> list[dict]:
        lines = self.path.read_text().splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by the kill: everything after it is redone
        return out

    def append(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
