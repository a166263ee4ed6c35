"""Eviction policies for one layer's expert slots. Plain Python on expert ids only.

The cache (offload/cache.py) owns the slots and the bytes; a policy only answers
"which resident expert should leave?". One policy instance serves one layer. The
cache calls, for every expert a layer uses at a step (hits and misses alike):

    policy.access(expert)          # the layer used it now
    policy.admit(expert)           # it was loaded into a slot (miss or prefetch)
    policy.evict(expert)           # it left its slot
    policy.victim(candidates)      # choose one of `candidates` (resident, not pinned)
    policy.tick()                  # one step (token) of this layer has ended

A replay (benchmarks/replay_routing.py) drives the same objects with trace ids.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class EvictionPolicy(Protocol):
    def access(self, expert: int) -> None: ...
    def admit(self, expert: int) -> None: ...
    def evict(self, expert: int) -> None: ...
    def victim(self, candidates: list[int]) -> int: ...
    def tick(self) -> None: ...


class LRU:
    """Least recently used: evict the candidate whose last access is oldest."""

    def __init__(self, num_experts: int, slots: int):
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def access(self, expert: int) -> None:
        self._order[expert] = None
        self._order.move_to_end(expert)

    def admit(self, expert: int) -> None:
        if expert not in self._order:
            self._order[expert] = None

    def evict(self, expert: int) -> None:
        self._order.pop(expert, None)

    def victim(self, candidates: list[int]) -> int:
        allowed = set(candidates)
        for expert in self._order:
            if expert in allowed:
                return expert
        return candidates[0]  # never touched: any is as old as the others

    def tick(self) -> None:
        pass


POLICIES = {"lru": LRU}


def make_policy(name: str, num_experts: int, slots: int, **kwargs) -> EvictionPolicy:
    """Build a policy by name; errors list the known names."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(num_experts, slots, **kwargs)
