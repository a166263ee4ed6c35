"""Speculative prefetch: which guessed experts to load for the next layer, and how good guesses were.

Plain Python on expert ids. The engine asks `plan(layer, guess_rows, slots)` for the
experts worth loading into `layer`'s slots (most-guessed first, at most `slots`), tells
it what it actually loaded or evicted, and, when `layer` runs, `observe(layer, chosen)`
scores the guess:
    issued  = experts loaded by prefetch
    used    = prefetched experts the layer then chose (before being evicted)
    recall  = sum |guessed & chosen| / sum |chosen| over the steps that had a guess

A guess competes with the cheapest predictor there is, "the layer reuses what it used at
its previous step" (routing is sticky: that is most of LRU's hits). Both are scored on
the same steps; while the guess has been the worse of the two, the prefetcher may not
evict the experts the layer used at its previous step (`protected`). Without this, at
K = top_k a mediocre guess replaced both residents every step (hit rate 0.72 -> 0.58 on
the shipped model).

Two more limits (the engine applies them, offload/engine.py):
    worth   a guess may evict only an expert used no more often than itself, the guess counting as
            one use (the router named it for the coming step): never a likelier expert;
    budget  PrefetchBudget: the copies must land before the layer needs them, so a layer step may
            queue only what the bus carries while the device computes that step, from the calibrated
            costs (offload/miss_policy.Costs): bytes = (device time - demand copies' bus time) x bandwidth.
A prefetched expert is "fresh" until its layer runs: used then, it is a prefetch used, not a hit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from offload.miss_policy import Costs, device_time


@dataclass(frozen=True)
class PrefetchBudget:
    """The bus time one layer step leaves for speculative copies (see the module docstring)."""

    costs: Costs
    expert_bytes: int

    def bytes(self, hits: int, copies: int) -> int:
        """Bytes a prefetch may queue behind a step of `hits` hits and `copies` demand copies."""
        c = self.costs
        free_s = device_time(hits, copies, c) - copies * c.copy  # device busy, bus idle
        return int(max(free_s, 0.0) / c.copy * self.expert_bytes)

    def experts(self, hits: int, copies: int) -> int:
        return self.bytes(hits, copies) // self.expert_bytes

    def describe(self) -> str:
        bw = self.expert_bytes / self.costs.copy / 1e9
        return f"prefetch budget: the device time of a layer step at {bw:.1f} GB/s (calibrated copy)"


class Prefetcher:
    def __init__(self, num_layers: int):
        self._guessed: list[set[int] | None] = [None] * num_layers
        self._loaded: list[set[int]] = [set() for _ in range(num_layers)]  # prefetched, not yet used
        self.issued = 0
        self.used = 0
        self.refused = 0  # guesses not loaded: the victim was used more often (the engine counts them)
        self.recall_hits = 0
        self.recall_total = 0
        self._last: list[set[int]] = [set() for _ in range(num_layers)]  # chosen at the layer's previous step
        self.repeat_hits = 0  # |previous step's experts & chosen|, on the steps that had a guess

    def plan(self, layer: int, guess_rows: list[list[int]], slots: int) -> list[int]:
        """Experts to load for `layer`, most-guessed first (ties: first guessed), at most `slots`."""
        counts = Counter(e for row in guess_rows for e in row)
        self._guessed[layer] = set(counts)
        return [e for e, _ in counts.most_common(slots)]

    def loaded(self, layer: int, expert: int) -> None:
        self._loaded[layer].add(expert)
        self.issued += 1

    def fresh(self, layer: int) -> set[int]:
        """Experts prefetched into `layer` and not yet used or evicted."""
        return set(self._loaded[layer])

    @staticmethod
    def worth(guess_uses: int, victim_uses: int | None) -> bool:
        """Whether a guess used `guess_uses` times may evict one used `victim_uses` times (None: a free slot)."""
        return victim_uses is None or victim_uses <= guess_uses + 1

    def evicted(self, layer: int, expert: int) -> None:
        self._loaded[layer].discard(expert)  # a wasted guess

    def observe(self, layer: int, chosen: set[int]) -> None:
        guessed = self._guessed[layer]
        if guessed is not None:
            self.recall_hits += len(guessed & chosen)
            self.repeat_hits += len(self._last[layer] & chosen)
            self.recall_total += len(chosen)
            self._guessed[layer] = None
        self._last[layer] = chosen
        self.used += len(self._loaded[layer] & chosen)
        self._loaded[layer].clear()

    def protected(self, layer: int) -> set[int]:
        """Experts a prefetch into `layer` must not evict: its previous step's, while guessing loses."""
        return self._last[layer] if self.recall_hits < self.repeat_hits else set()

    def recall(self) -> float | None:
        return self.recall_hits / self.recall_total if self.recall_total else None
