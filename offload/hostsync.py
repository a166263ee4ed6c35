"""Every device -> host read on the hot path goes through `to_host`, so a test can count them.

DESIGN.md allows one host synchronisation per layer (the top-k ids, with the prefetch guess) and
generation one per token (the sampled ids, with the finiteness check): `layers + 1` per decoded
token. tests/test_host_syncs.py holds the code to that budget through `observe`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_observers: list[Callable[[torch.Tensor], None]] = []


def to_host(t: torch.Tensor) -> list:
    """t.tolist(): on CUDA one copy to the host and one wait for the stream that produced t."""
    for fn in _observers:
        fn(t)
    return t.tolist()


@contextmanager
def observe(fn: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call fn(t) for every to_host(t) inside the block."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)
