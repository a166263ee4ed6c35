"""Where a run computes: the device (--device), the compute dtype (--dtype) and torch's CPU threads (-t).

Threads when the user does not say (llama.cpp's rule): the physical cores (a second hyper-thread
per core only adds contention to a memory-bound decode), here also bounded by the cores this
process may run on. On a machine where other work is running, OpenMP threads that wait at every
barrier for a core someone else holds are many times slower than fewer threads (on a busy 2-core
machine 2 threads ran 3-6x slower than 1), so the cores the 1-minute load average says are busy
are left out.
"""

from __future__ import annotations

import os
import sys

import torch

from ..model.config import DTYPES, ModelConfig


def available_cores() -> tuple[int, int]:
    """(physical cores we may use, logical CPUs we may use)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return max(1, min(physical, logical)), logical


def default_threads() -> tuple[int, str]:
    """(threads, why) for torch.set_num_threads."""
    physical, logical = available_cores()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    idle = int(logical - load + 0.5)  # CPUs the recent load leaves free, rounded
    n = max(1, min(physical, idle))
    why = f"{physical} physical core{'s' * (physical != 1)}"
    if n < physical:
        why += f", load average {load:.2f} from other work"
    return n, why


def pick_device(name: str) -> torch.device:
    """auto: CUDA when there is one; cuda without one is a one-line error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available (try --device cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """--dtype, else float32 on the CPU and the checkpoint's own on CUDA (float16 for a float32 checkpoint)."""
    if name:
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    dtype = DTYPES[cfg.dtype]
    return torch.float16 if dtype == torch.float32 else dtype


def set_threads(threads: int | None) -> int:
    """torch's CPU threads: -t, else default_threads() (printed, with why); returns the number set."""
    if threads is None:
        threads, why = default_threads()
        print(f"threads: {threads} ({why}; -t N to choose)", file=sys.stderr)
    torch.set_num_threads(threads)
    return threads
