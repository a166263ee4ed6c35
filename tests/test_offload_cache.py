"""Device cache bookkeeping driven with expert ids alone."""

from __future__ import annotations

import pytest
import torch

from offload.cache import CacheFull, ExpertCache
from offload.prefetch import Prefetcher


def replay(cache: ExpertCache, layer: int, seq: list[int]) -> list[int | None]:
    """Use experts one step at a time (access, load on miss, tick); return what each step evicted."""
    evicted = []
    for e in seq:
        cache.access(layer, e)
        out = None
        if cache.slot_of(layer, e) is None:
            _, out = cache.place(layer, e, pinned={(layer, e)})
        cache.tick(layer)
        evicted.append(None if out is None else out[1])
    return evicted


def test_lru_eviction_order():
    cache = ExpertCache(1, 8, 3, 16, "cpu", "lru")
    got = replay(cache, 0, [0, 1, 2, 0, 3, 4, 0, 5, 1])
    # 3 evicts 1 (0 was reused), 4 evicts 2, 5 evicts 3, 1 evicts 4 (0 still fresher)
    assert got == [None, None, None, None, 1, 2, None, 3, 4]
    assert sorted(cache.resident(0)) == [0, 1, 5]


def test_layers_are_independent_and_slots_unique():
    cache = ExpertCache(2, 4, 2, 8, "cpu")
    replay(cache, 0, [0, 1, 2, 3])
    replay(cache, 1, [3])
    assert sorted(cache.resident(0)) == [2, 3] and cache.resident(1) == [3]
    slots = {cache.slot_of(0, e) for e in cache.resident(0)}
    assert slots == {0, 1}  # slot keys: layer * K + slot
    assert {cache.slot_of(1, 3)} == {2}


def test_pinned_experts_are_never_victims():
    cache = ExpertCache(1, 6, 2, 8, "cpu")
    cache.place(0, 0, set())
    cache.place(0, 1, set())
    _, evicted = cache.place(0, 2, pinned={(0, 0)})  # LRU would pick 0 (admitted first); it is pinned
    assert evicted == (0, 1)
    with pytest.raises(CacheFull, match="layer 0: all 2 slots hold pinned experts"):
        cache.place(0, 3, pinned={(0, 0), (0, 2)})


def test_slot_range_is_checked():
    with pytest.raises(ValueError, match="slots per layer must be in 1..4"):
        ExpertCache(1, 4, 5, 8, "cpu")


def test_pool_is_allocated_once_with_exact_size():
    cache = ExpertCache(3, 8, 2, 1000, "cpu")
    assert cache.pool.shape == (3, 2, 1000) and cache.pool.dtype == torch.uint8
    assert cache.allocated_bytes == 3 * 2 * 1000


def test_prefetcher_scores_guesses():
    p = Prefetcher(2)
    assert p.plan(1, [[0, 1], [1, 2], [1, 3]], slots=2) == [1, 0]
    p.loaded(1, 1)
    p.loaded(1, 0)
    p.evicted(1, 0)
    p.observe(1, {1, 0, 5})
    assert (p.issued, p.used) == (2, 1)  # 0 was evicted before use: wasted
    assert p.recall() == 2 / 3  # guessed {0,1,2,3} & chosen {0,1,5}
    p.observe(0, {4})  # no guess for layer 0: recall unchanged
    assert p.recall() == 2 / 3
