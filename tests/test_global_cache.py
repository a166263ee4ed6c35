"""One slot pool for every layer (offload/global_cache.py), driven with expert ids alone: the eviction order
across layers, the quota, pinned experts, and equality with per-layer caches at the same number of slots."""

from __future__ import annotations

import random

import pytest

from offload.cache import CacheFull, ExpertCache
from offload.global_cache import GlobalCache, make_cache


def step(cache, layer: int, ids: list[int]) -> list[tuple[int, int] | None]:
    """One layer step in the engine's order: access all, place the misses (the step's experts pinned), tick."""
    for e in ids:
        cache.access(layer, e)
    pinned, out = {(layer, e) for e in ids}, []
    for e in ids:
        if cache.slot_of(layer, e) is None:
            out.append(cache.place(layer, e, pinned)[1])
    cache.tick(layer)
    return out


def test_the_docstrings_worked_example_evicts_across_layers():
    cache = GlobalCache(2, 8, 5, 4, "cpu")
    assert cache.quota == 2
    assert step(cache, 0, [0, 1]) == [None, None] and step(cache, 1, [5, 6]) == [None, None]
    assert step(cache, 0, [2, 3]) == [None, (0, 0)]  # the free slot, then L0's own: L1 holds only its quota
    assert step(cache, 1, [5, 7]) == [(0, 1)]  # L0 holds 3 > quota; (0,1) is older than (1,6)
    assert sorted(cache.resident(0)) == [2, 3] and sorted(cache.resident(1)) == [5, 6, 7]
    keys = [cache.slot_of(layer, e) for layer in (0, 1) for e in cache.resident(layer)]
    assert sorted(keys) == list(range(5))  # every slot key held once


def test_a_layer_never_evicts_what_it_needs_this_step():
    cache = GlobalCache(2, 4, 3, 4, "cpu")
    step(cache, 0, [0, 1])
    step(cache, 1, [2])
    # layer 1 now needs 2 and 3: LRU's oldest is (0,0), then (0,1); (1,2) is pinned although it is a candidate
    assert step(cache, 1, [2, 3]) == [(0, 0)]
    cache.access(1, 0)
    with pytest.raises(CacheFull, match="layer 1: the 3 pool slots it may take hold pinned experts"):
        cache.place(1, 0, {(1, 2), (1, 3), (0, 1)})


def test_the_quota_keeps_other_layers_off_a_layers_slots():
    cache = GlobalCache(2, 8, 4, 4, "cpu")  # quota 2, nothing floats
    step(cache, 0, [0, 1])
    step(cache, 1, [4, 5])
    for ids in ([6, 7], [2, 3], [0, 6]):  # layer 1 churns; it may only ever evict its own
        assert all(v[0] == 1 for v in step(cache, 1, ids) if v is not None)
    assert sorted(cache.resident(0)) == [0, 1]


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_at_layers_times_k_slots_the_pool_is_the_per_layer_cache(policy, k):
    rng = random.Random(k)
    layers, experts = 4, 8
    a, b = ExpertCache(layers, experts, k, 4, "cpu", policy), GlobalCache(layers, experts, layers * k, 4, "cpu", policy)
    for _ in range(200):
        for layer in range(layers):
            ids = rng.sample(range(experts), 2)
            assert step(a, layer, ids) == step(b, layer, ids)
            assert sorted(a.resident(layer)) == sorted(b.resident(layer))


def test_spare_slots_go_to_the_layers_that_use_them_and_bounds_are_checked():
    cache = GlobalCache(2, 8, 7, 4, "cpu")  # quota 3, one slot floats
    step(cache, 0, [0, 1])
    for ids in ([2, 3], [4, 5], [6, 7]):
        step(cache, 1, ids)  # layer 1 wanders: it takes the spare slot, never the one layer 0 has a claim to
    assert len(cache.resident(1)) == 4 and len(cache.resident(0)) == 2 and len(cache._free) == 1
    step(cache, 0, [2])  # layer 0's claim: the last free slot
    assert len(cache.resident(0)) == 3 and not cache._free
    with pytest.raises(ValueError, match=r"pool slots must be in 1..16 \(layers x experts\), got 17"):
        GlobalCache(2, 8, 17, 4, "cpu")
    with pytest.raises(ValueError, match="--cache-policy markov: the global pool takes lru or lfu"):
        make_cache("global", 2, 8, 4, 4, "cpu", "markov")
    with pytest.raises(ValueError, match="--expert-pool 'ring': choose global or layer"):
        make_cache("ring", 2, 8, 4, 4, "cpu")
