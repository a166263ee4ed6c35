"""Eviction policies on hand-written expert-id sequences: exact victims, Belady's optimality."""

from __future__ import annotations

import random

import pytest

from offload.policy import LFU, LRU, ONLINE, Belady, Markov, NextStepOracle, make_policy


def run(policy, steps: list[list[int]], slots: int) -> tuple[list[int], int]:
    """Drive a policy like offload/cache.py does; return (victims in order, misses)."""
    resident: set[int] = set()
    victims, misses = [], 0
    for ids in steps:
        for e in ids:
            policy.access(e)
        for e in ids:
            if e in resident:
                continue
            misses += 1
            if len(resident) >= slots:
                v = policy.victim(sorted(resident - set(ids)))
                policy.evict(v)
                resident.remove(v)
                victims.append(v)
            resident.add(e)
            policy.admit(e)
        policy.tick()
    return victims, misses


def test_lru_evicts_least_recently_used():
    steps = [[0, 1], [2, 0], [3, 4], [1, 3], [0, 2]]
    # [2,0]: 2 takes the free slot. [3,4]: 3 evicts 1 (oldest); 4 evicts 2 (step 1 accessed
    # 2 before 0). [1,3]: 1 evicts 0. [0,2]: 0 evicts 4, then 2 evicts 1 (3 is needed).
    victims, misses = run(LRU(8, 3), steps, 3)
    assert victims == [1, 2, 0, 4, 1]
    assert misses == 8


def test_lfu_evicts_least_frequent_with_lru_tie_break():
    steps = [[0, 1], [0, 2], [0, 1], [3, 4], [2, 5]]
    # counts before [3,4]: 0:3 1:2 2:1. 3 evicts 2 (count 1); 4 must evict among {0,1}: 1 (2 < 3).
    # [2,5] (counts 0:3 3:1 4:1): 2 evicts 3 (tie with 4 at count 1, 3 accessed first = older);
    # 5 evicts 4 (count 1 < 3).
    victims, _ = run(LFU(8, 3), steps, 3)
    assert victims == [2, 1, 3, 4]


def test_lfu_never_used_candidates_go_first_lowest_id():
    p = LFU(8, 4)
    p.access(5)
    assert p.victim([7, 5, 6]) == 6


def test_belady_evicts_the_candidate_used_furthest_in_future():
    future = [[0, 1], [2, 3], [0, 4], [2, 5], [1, 6]]
    p = Belady(8, 4, future=future)
    p.tick()  # now at step 1: candidates 0 (next at 2), 1 (next at 4)
    assert p.victim([0, 1]) == 1
    assert p.next_use(0) == 2 and p.next_use(1) == 4
    p.tick()
    assert p.next_use(3) == float("inf")
    assert p.victim([1, 3]) == 3  # never used again beats any future use
    assert p.victim([6, 1]) == 1  # equal next use (step 4): lowest id


@pytest.mark.parametrize("seed", range(20))
def test_belady_misses_no_more_than_any_online_policy(seed):
    rng = random.Random(seed)
    hot = rng.sample(range(8), 3)  # some locality so policies differ
    steps = []
    for _ in range(120):
        a = rng.choice(hot) if rng.random() < 0.6 else rng.randrange(8)
        b = rng.choice([e for e in range(8) if e != a])
        steps.append([a, b])
    for slots in (3, 4, 6):
        _, best = run(Belady(8, slots, future=steps), steps, slots)
        for name in ONLINE:
            _, misses = run(make_policy(name, 8, slots), steps, slots)
            assert best <= misses, (name, slots)
        _, oracle = run(NextStepOracle(8, slots, future=steps), steps, slots)
        assert best <= oracle


def test_markov_keeps_what_usually_follows_where_lru_does_not():
    steps = [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [5, 6]]
    markov, lru = Markov(8, 3), LRU(8, 3)
    for p in (markov, lru):
        for ids in steps:
            for e in ids:
                p.access(e)
            p.tick()
        p.access(0)
        p.access(1)
    # After {0,1} came {2,3} twice and {5,6} once: Markov expects 2 next, so 5 goes;
    # LRU only sees that 2 is older than 5.
    assert markov.next_use_probability(2) > markov.next_use_probability(5)
    assert markov.victim([2, 5]) == 5
    assert lru.victim([2, 5]) == 2


def test_markov_without_history_falls_back_to_recency():
    p = Markov(8, 4)
    p.access(2)
    p.access(1)
    # no finished step: every estimate is the same prior, so never-used goes, then the older
    assert p.victim([1, 2, 6]) == 6
    assert p.victim([1, 2]) == 2


def test_markov_frequency_decides_between_unseen_transitions():
    p = Markov(8, 4)
    for ids in ([4, 5], [4, 5], [4, 6]):  # 6 is the more recent, 5 the more frequent
        for e in ids:
            p.access(e)
        p.tick()
    p.access(7)  # 7 has no transition counts: the marginal frequency of 5 (2 steps) beats 6 (1)
    assert p.victim([5, 6]) == 6
    assert p.victim([6, 5]) == 6


def test_next_step_oracle_evicts_what_the_next_step_does_not_use():
    steps = [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [5, 6], [0, 1], [5, 7]]
    oracle, o_misses = run(NextStepOracle(8, 3, future=steps), steps, 3)
    markov, m_misses = run(Markov(8, 3), steps, 3)
    # step 6 ([0,1]) loads 0 and 1 over {5, 6}: markov, like LRU, first drops 5, the
    # older one; the oracle knows step 7 uses 5 and drops 6, saving one miss
    assert markov[6:8] == [5, 6] and oracle[6] == 6
    assert (o_misses, m_misses) == (11, 12)


def test_make_policy_errors_name_the_choices():
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'.*belady.*lfu.*lru.*markov.*next-oracle"):
        make_policy("fifo", 8, 4)
    with pytest.raises(ValueError, match="belady needs future"):
        make_policy("belady", 8, 4)
    with pytest.raises(ValueError, match="expert id 9"):
        Belady(8, 4, future=[[0, 9]])
