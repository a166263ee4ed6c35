"""One slot pool for every layer: N device slots, any of which may hold any (layer, expert).

Same calls as offload/cache.py's per-layer ExpertCache (see its docstring), so both engines take
either. One eviction policy (offload/policy.py) sees every layer's accesses, keyed layer * E + expert,
so a global LRU evicts the expert whose last use is oldest across all layers: a layer whose routing
wanders gets more slots than one that keeps to a few experts, and a budget between K and K + 1 slots
per layer leaves at most one slot's bytes idle instead of up to a layer's worth.

Policies: lru and lfu (their state is per key, so one instance serves every layer); markov predicts one
layer's next step from its previous one, which a shared instance cannot, so it is refused here.

Worked example, 2 layers, 3 slots, LRU, one token = layer 0 then layer 1:
    token 0: L0 uses 0, 1; L1 uses 5         -> (0,0) (0,1) (1,5): the pool is full
    token 1: L0 uses 0, 2 -> (0,2) evicts (0,1): the oldest use outside the step's pinned {(0,0), (0,2)}
             L1 uses 5, 6 -> (1,6) evicts (0,0): older than (0,2), and (1,5) is pinned
(tests/test_global_cache.py replays it). Layer 1 now holds 2 slots, layer 0 one.
"""

from __future__ import annotations

import torch

from offload.cache import CacheFull, ExpertCache
from offload.policy import make_policy

POOL_POLICIES = ("lru", "lfu")


class GlobalCache:
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
        self.pool = torch.empty((slots, nbytes), dtype=torch.uint8, device=device)
        self.allocated_bytes = self.pool.numel()
        self._slot_of: list[dict[int, int]] = [{} for _ in range(num_layers)]  # per layer: expert -> slot key
        self._free = list(range(slots - 1, -1, -1))
        self.policy = make_policy(policy, total, slots)
        self._uses = [[0] * num_experts for _ in range(num_layers)]

    def _code(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert

    def buffer(self, key: int) -> torch.Tensor:
        return self.pool[key]

    def buffers(self) -> list[torch.Tensor]:
        return list(self.pool)

    def slot_of(self, layer: int, expert: int) -> int | None:
        return self._slot_of[layer].get(expert)

    def resident(self, layer: int) -> list[int]:
        return list(self._slot_of[layer])

    def uses(self, layer: int, expert: int) -> int:
        return self._uses[layer][expert]

    def access(self, layer: int, expert: int) -> None:
        self._uses[layer][expert] += 1
        self.policy.access(self._code(layer, expert))

    def tick(self, layer: int) -> None:
        self.policy.tick()  # lru and lfu keep no per-step state

    def _candidates(self, pinned: set[tuple[int, int]]) -> list[int]:
        return [self._code(layer, e) for layer, held in enumerate(self._slot_of) for e in held
                if (layer, e) not in pinned]

    def can_place(self, layer: int, pinned: set[tuple[int, int]]) -> bool:
        return bool(self._free) or any((lay, e) not in pinned for lay, held in enumerate(self._slot_of)
                                       for e in held)

    def victim(self, layer: int, pinned: set[tuple[int, int]]) -> tuple[int, int] | None:
        """The (layer, expert) a load would evict now, from any layer; None when a slot is free."""
        if self._free:
            return None
        candidates = self._candidates(pinned)
        if not candidates:
            raise CacheFull(f"all {self.slots} pool slots hold pinned experts")
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
