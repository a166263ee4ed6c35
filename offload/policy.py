"""Eviction policies for one layer's expert slots. Plain Python on expert ids only.

The cache (offload/cache.py) owns the slots and the bytes; a policy only answers
"which resident expert should leave?". One policy instance serves one layer. The
cache calls, for every expert a layer uses at a step (hits and misses alike):

    policy.access(expert)          # the layer used it now
    policy.admit(expert)           # it was loaded into a slot (miss or prefetch)
    policy.evict(expert)           # it left its slot
    policy.victim(candidates)      # choose one of `candidates` (resident, not pinned)
    policy.tick()                  # one step (token) of this layer has ended

Order within a step (offload/cache.py and benchmarks/replay_routing.py both follow it):
access() for every expert the step uses, then victim/evict/admit per load, then tick().
LRU and LFU do not care; Markov predicts from the step's experts, so it needs the
accesses first (it falls back to the previous step's experts if it has none).

Policies (names for `make_policy`):
    lru     least recently used (the predecessor's policy, our baseline)
    lfu     least frequently used over the layer's whole history; ties -> LRU
    markov  ours, online: evict the expert least likely to be used at the next step,
            estimated from this layer's own expert->expert transition counts
    belady  the offline optimum (replay only: needs the future, see Belady)
    next-oracle  markov told the next step's experts (replay only): a prediction ceiling

On the real Mixtral-8x7B decode traces (benchmarks/README.md) at 4 slots per layer,
hit rates are LRU 0.597/0.622 (gsm8k/humaneval), LFU 0.613/0.639, markov 0.621/0.648,
Belady 0.727/0.747: markov closes 18%/20% of the LRU-Belady gap, not half.
next-oracle, which knows the next step exactly, reaches 0.677/0.697, i.e. only ~60% of
the gap: an online policy would need a near-perfect next-step predictor to close half.
"""

from __future__ import annotations

import bisect
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


class _Clocked:
    """Shared bookkeeping: a counter of accesses and each expert's last access time."""

    def __init__(self, num_experts: int):
        self._clock = 0
        self._last = [-1] * num_experts  # -1 = never accessed

    def _touch(self, expert: int) -> None:
        self._clock += 1
        self._last[expert] = self._clock

    def admit(self, expert: int) -> None:
        pass

    def evict(self, expert: int) -> None:
        pass


class LFU(_Clocked):
    """Least frequently used: fewest accesses since the start (counts survive eviction).

    Tie-break: among equal counts the least recently accessed goes, then the lowest id.
    """

    def __init__(self, num_experts: int, slots: int):
        super().__init__(num_experts)
        self._count = [0] * num_experts

    def access(self, expert: int) -> None:
        self._count[expert] += 1
        self._touch(expert)

    def victim(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda e: (self._count[e], self._last[e], e))

    def tick(self) -> None:
        pass


class Markov(_Clocked):
    """Ours: evict the candidate least likely to be used at the next step.

    Online, from this layer's history only. After each step it counts, for every expert
    i used at that step, which experts j were used at the following step: C[i][j], N[i].
    At a victim choice during step t (context S = the experts accessed so far at t):

        p(j) = mean over i in S of (C[i][j] + alpha * f(j)) / (N[i] + alpha)

    where f(j) = (uses of j + 1) / (steps + E) * (accesses per step) is j's smoothed
    marginal frequency, so with little history the policy behaves like LFU. Lowest p
    leaves; ties go to the least recently accessed, then the lowest id. O(E^2) memory.
    alpha (default 1) barely matters on the Mixtral traces: 0.5..8 changes the hit rate
    at 4 slots by < 0.001.
    """

    def __init__(self, num_experts: int, slots: int, alpha: float = 1.0):
        if alpha <= 0:
            raise ValueError(f"markov: alpha must be > 0, got {alpha}")
        super().__init__(num_experts)
        self._n, self._alpha = num_experts, alpha
        self._pairs = [[0] * num_experts for _ in range(num_experts)]  # C[i][j]
        self._from = [0] * num_experts  # N[i]: steps that used i and had a next step
        self._uses = [0] * num_experts
        self._steps = self._accesses = 0
        self._prev: list[int] = []  # experts of the last finished step
        self._cur: list[int] = []  # experts accessed so far in this step

    def access(self, expert: int) -> None:
        if expert not in self._cur:
            self._cur.append(expert)
        self._touch(expert)

    def next_use_probability(self, expert: int) -> float:
        """The policy's estimate that `expert` is used at the next step."""
        per_step = self._accesses / self._steps if self._steps else 1.0
        marginal = (self._uses[expert] + 1) / (self._steps + self._n) * per_step
        context = self._cur or self._prev
        if not context:
            return marginal
        a = self._alpha
        total = sum((self._pairs[i][expert] + a * marginal) / (self._from[i] + a) for i in context)
        return total / len(context)

    def victim(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda e: (self.next_use_probability(e), self._last[e], e))

    def tick(self) -> None:
        for i in self._prev:
            self._from[i] += 1
            for j in self._cur:
                self._pairs[i][j] += 1
        for j in self._cur:
            self._uses[j] += 1
        self._steps += 1
        self._accesses += len(self._cur)
        self._prev, self._cur = self._cur, []


class Belady:
    """Belady's MIN, the offline optimum: evict the candidate whose next use is furthest.

    Replay only, since it must be given the layer's whole future up front:

        Belady(num_experts, slots, future=[[ids of step 0], [ids of step 1], ...])

    Step 0 is current until the first tick(); each tick() advances one step. The next
    use of a candidate is its first step strictly after the current one (candidates are
    not needed now); never used again counts as infinitely far. Ties: the lowest id.
    """

    def __init__(self, num_experts: int, slots: int, future: list[list[int]] | None = None):
        if future is None:
            raise ValueError("belady needs future=[[ids of step 0], ...]: it is for replays, not a live cache")
        self._step = 0
        self._uses: list[list[int]] = [[] for _ in range(num_experts)]  # steps using e, ascending
        for step, ids in enumerate(future):
            for e in set(ids):
                if not 0 <= e < num_experts:
                    raise ValueError(f"belady: expert id {e} at step {step} outside 0..{num_experts - 1}")
                self._uses[e].append(step)

    def next_use(self, expert: int) -> float:
        uses = self._uses[expert]
        i = bisect.bisect_right(uses, self._step)
        return uses[i] if i < len(uses) else float("inf")

    def access(self, expert: int) -> None:
        pass

    def admit(self, expert: int) -> None:
        pass

    def evict(self, expert: int) -> None:
        pass

    def victim(self, candidates: list[int]) -> int:
        return max(candidates, key=lambda e: (self.next_use(e), -e))

    def tick(self) -> None:
        self._step += 1


class NextStepOracle(Markov):
    """Markov that is told the next step's experts (replay only): a ceiling for prediction.

    Built like Belady (future=[[ids of step 0], ...]). It evicts a candidate the next step
    does not use whenever there is one, choosing among those as Markov would. It shows how
    far a perfect one-step-ahead predictor could take an online policy.
    """

    def __init__(self, num_experts: int, slots: int, future: list[list[int]] | None = None, alpha: float = 1.0):
        if future is None:
            raise ValueError("next-oracle needs future=[[ids of step 0], ...]: it is for replays")
        super().__init__(num_experts, slots, alpha)
        self._future, self._step = future, 0

    def victim(self, candidates: list[int]) -> int:
        upcoming = self._future[self._step + 1] if self._step + 1 < len(self._future) else []
        unused = [e for e in candidates if e not in upcoming]
        return super().victim(unused or candidates)

    def tick(self) -> None:
        super().tick()
        self._step += 1


POLICIES = {"lru": LRU, "lfu": LFU, "markov": Markov, "belady": Belady, "next-oracle": NextStepOracle}
ONLINE = ("lru", "lfu", "markov")  # the ones a live cache can use


def make_policy(name: str, num_experts: int, slots: int, **kwargs) -> EvictionPolicy:
    """Build a policy by name; errors list the known names."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(num_experts, slots, **kwargs)
