"""One slot pool for every layer: N device slots, any of which may hold any (layer, expert).

Same calls as offload/cache.py's per-layer ExpertCache (see its docstring), so both engines take
either. One eviction policy (offload/policy.py) sees every layer's accesses, keyed layer * E + expert.
Each layer keeps a quota of Q = N // L slots no other layer may take (free ones included); the other
N - L x Q slots float. A load into layer l evicts the policy's choice among l's own unpinned experts and those of layers
holding more than Q. So at N = L x K the pool is the per-layer cache exactly (same victims, same hits:
tests/test_global_cache.py), and a budget between K and K + 1 slots per layer leaves at most one slot's
bytes idle: the spare slots go to whichever layers use them.

Why a quota: an unrestricted global LRU (or LFU) at equal bytes lost to per-layer caches on every
shipped trace (gsm8k decode, K = 4 slots a layer: per-layer LRU 0.597, global LRU 0.532; K = 3: 0.471
vs 0.350; benchmarks/replay_pool.py): every layer is used once per token, so recency across layers
says little, and one wandering layer drains the slots that sticky layers hit with.

Policies: lru and lfu (their state is per key, so one instance serves every layer); markov predicts one
layer's next step from its previous one, which a shared instance cannot, so it is refused here.

Worked example, 2 layers, 5 slots (quota 2, one floating), LRU, one token = layer 0 then layer 1:
    token 0: L0 uses 0, 1; L1 uses 5, 6    -> 4 slots taken, 1 free
    token 1: L0 uses 2, 3 -> (0,2) takes the free slot; (0,3) evicts (0,0): L1 holds only its quota
             L1 uses 5, 7 -> (1,7) evicts (0,1): L0 holds 3 > 2, and (0,1) is older than (1,6)
(tests/test_global_cache.py replays it).
"""

from __future__ import annotations

import torch

from offload.cache import CacheFull, ExpertCache, SlotPool
from offload.policy import make_policy

POOL_POLICIES = ("lru", "lfu")


class GlobalCache(SlotPool):
    """pool [N, nbytes] uint8 on the device; slot keys are 0 .. N - 1."""

    kind = "global"

    def __init__(self, num_layers: int, num_experts: int, slots: int, nbytes: int,
                 device: torch.device | str, policy: str = "lru"):
        total = num_layers * num_experts
        if not 1 <= slots <= total:
            raise ValueError(f"pool slots must be in 1..{total} (layers x experts), got {slots}")
        if policy not in POOL_POLICIES:
            raise ValueError(f"--cache-policy {policy}: the global pool takes {' or '.join(POOL_POLICIES)} "
                             "(markov is per layer: --expert-pool layer)")
        self.num_layers, self.num_experts, self.slots, self.nbytes = num_layers, num_experts, slots, nbytes
        self.num_slots = slots
        super().__init__(num_layers, num_experts, torch.empty((slots, nbytes), dtype=torch.uint8, device=device))
        self._free = list(range(slots - 1, -1, -1))
        self.quota = slots // num_layers  # slots no other layer may take from a layer
        self.policy = make_policy(policy, total, slots)

    def _code(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert

    def access(self, layer: int, expert: int) -> None:
        self._uses[layer][expert] += 1
        self.policy.access(self._code(layer, expert))

    def tick(self, layer: int) -> None:
        self.policy.tick()  # lru and lfu keep no per-step state

    def _candidates(self, layer: int, pinned: set[tuple[int, int]]) -> list[int]:
        """The loading layer's own unpinned experts, and those of layers holding more than the quota."""
        return [self._code(lay, e) for lay, held in enumerate(self._slot_of)
                if lay == layer or len(held) > self.quota for e in held if (lay, e) not in pinned]

    def _may_take_free(self, layer: int) -> bool:
        """A free slot is the layer's when it is under its quota, or when more slots are free than the layers
        under quota still have a claim to (so at N = L x K no layer ever holds more than K)."""
        if not self._free:
            return False
        if len(self._slot_of[layer]) < self.quota:
            return True
        claims = sum(max(self.quota - len(held), 0) for held in self._slot_of)
        return len(self._free) > claims

    def can_place(self, layer: int, pinned: set[tuple[int, int]]) -> bool:
        return self._may_take_free(layer) or bool(self._candidates(layer, pinned))

    def victim(self, layer: int, pinned: set[tuple[int, int]]) -> tuple[int, int] | None:
        """The (layer, expert) a load would evict now, from any layer; None when it takes a free slot."""
        if self._may_take_free(layer):
            return None
        candidates = self._candidates(layer, pinned)
        if not candidates:
            raise CacheFull(f"layer {layer}: the {self.slots} pool slots it may take hold pinned experts")
        code = self.policy.victim(candidates)
        if code not in candidates:
            raise RuntimeError(f"policy chose {code}, not one of the candidates")
        return divmod(code, self.num_experts)

    def place(self, layer: int, expert: int, pinned: set[tuple[int, int]]) -> tuple[int, tuple[int, int] | None]:
        """A slot for (layer, expert) (not resident): a free one, else the policy's victim outside `pinned`."""
        if expert in self._slot_of[layer]:
            raise ValueError(f"layer {layer} expert {expert} is already resident")
        evicted = self.victim(layer, pinned)
        if evicted is None:
            slot = self._free.pop()
        else:
            slot = self._slot_of[evicted[0]].pop(evicted[1])
            self.policy.evict(self._code(*evicted))
        self._slot_of[layer][expert] = slot
        self.policy.admit(self._code(layer, expert))
        return slot, evicted


def make_cache(pool: str, num_layers: int, num_experts: int, slots: int, nbytes: int,
               device: torch.device | str, policy: str = "lru"):
    """pool "layer": `slots` per layer (ExpertCache); "global": `slots` in all (GlobalCache)."""
    if pool == "layer":
        return ExpertCache(num_layers, num_experts, slots, nbytes, device, policy)
    if pool == "global":
        return GlobalCache(num_layers, num_experts, slots, nbytes, device, policy)
    raise ValueError(f"--expert-pool {pool!r}: choose global or layer")
