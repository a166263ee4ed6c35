"""The device expert cache: K slots per layer, allocated once, and who sits where.

Mechanism only: the pool of bytes, the expert <-> slot maps, and the calls into one
eviction policy per layer (offload/policy.py decides; this file obeys). Loading bytes
into a slot is the caller's job (offload/transfer.py); eviction never writes back.
offload/global_cache.py is the other pool, one for all layers, behind the same calls:

    slot_of(layer, e) -> slot key (0 .. num_slots - 1) or None; buffer(key) -> its bytes
    place(layer, e, pinned) -> (key, evicted (layer, expert) or None)
    victim(layer, pinned) -> the (layer, expert) `place` would evict now (None: a slot is free)
    pinned: a set of (layer, expert) that must stay (a layer's experts of the step, copies in flight)

Policy call order for one step of one layer (what a replay must reproduce):
    access(e) for every expert the layer uses, in order of first use;
    then, per expert loaded (demand miss or prefetch): victim(...) if no slot is free,
    evict(victim), admit(e);
    tick() when the layer's step has ended.
"""

from __future__ import annotations

import torch

from offload.policy import make_policy


class CacheFull(RuntimeError):
    """Every slot a load could take holds a pinned expert."""


class SlotPool:
    """What both pools share: the bytes (any shape whose last dimension is one slot), who sits where,
    and how often each layer used each expert. Slot keys index the pool's slots in storage order."""

    def __init__(self, num_layers: int, num_experts: int, pool: torch.Tensor):
        self.pool = pool
        self._flat = pool.view(-1, pool.shape[-1])
        self.allocated_bytes = pool.numel()  # the pool's own allocations, all of them
        self._slot_of: list[dict[int, int]] = [{} for _ in range(num_layers)]  # per layer: expert -> slot key
        self._uses = [[0] * num_experts for _ in range(num_layers)]

    def buffer(self, key: int) -> torch.Tensor:
        return self._flat[key]

    def buffers(self) -> list[torch.Tensor]:
        return list(self._flat)

    def slot_of(self, layer: int, expert: int) -> int | None:
        return self._slot_of[layer].get(expert)

    def resident(self, layer: int) -> list[int]:
        return list(self._slot_of[layer])

    def uses(self, layer: int, expert: int) -> int:
        """Steps of `layer` that used `expert` so far (whether resident or not)."""
        return self._uses[layer][expert]


class ExpertCache(SlotPool):
    """pool [L, K, nbytes] uint8 on the device; nothing else is ever allocated here. Slot keys are
    layer * K + slot."""

    kind = "layer"

    def __init__(
        self, num_layers: int, num_experts: int, slots: int, nbytes: int,
        device: torch.device | str, policy: str = "lru",
    ):
        if not 1 <= slots <= num_experts:
            raise ValueError(f"slots per layer must be in 1..{num_experts}, got {slots}")
        self.num_layers, self.num_experts, self.slots, self.nbytes = num_layers, num_experts, slots, nbytes
        self.num_slots = num_layers * slots
        self.quota = slots  # slots a layer always has (GlobalCache's name for it)
        super().__init__(num_layers, num_experts,
                         torch.empty((num_layers, slots, nbytes), dtype=torch.uint8, device=device))
        self._free: list[list[int]] = [list(range((layer + 1) * slots - 1, layer * slots - 1, -1))
                                       for layer in range(num_layers)]
        self.policies = [make_policy(policy, num_experts, slots) for _ in range(num_layers)]

    def access(self, layer: int, expert: int) -> None:
        self._uses[layer][expert] += 1
        self.policies[layer].access(expert)

    def tick(self, layer: int) -> None:
        self.policies[layer].tick()

    def _candidates(self, layer: int, pinned: set[tuple[int, int]]) -> list[int]:
        return [e for e in self._slot_of[layer] if (layer, e) not in pinned]

    def can_place(self, layer: int, pinned: set[tuple[int, int]]) -> bool:
        return bool(self._free[layer]) or bool(self._candidates(layer, pinned))

    def victim(self, layer: int, pinned: set[tuple[int, int]]) -> tuple[int, int] | None:
        """The (layer, expert) a load into `layer` would evict now; None when a slot is free."""
        if self._free[layer]:
            return None
        candidates = self._candidates(layer, pinned)
        if not candidates:
            raise CacheFull(f"layer {layer}: all {self.slots} slots hold pinned experts")
        evicted = self.policies[layer].victim(candidates)
        if evicted not in candidates:
            raise RuntimeError(f"policy chose {evicted}, not one of the candidates {candidates}")
        return layer, evicted

    def place(self, layer: int, expert: int, pinned: set[tuple[int, int]]) -> tuple[int, tuple[int, int] | None]:
        """A slot for `expert` (not resident): a free one, else the policy's victim outside `pinned`.

        Returns (slot key, evicted (layer, expert) or None). The caller then loads the bytes.
        """
        if expert in self._slot_of[layer]:
            raise ValueError(f"layer {layer} expert {expert} is already resident")
        evicted = self.victim(layer, pinned)
        policy = self.policies[layer]
        if evicted is None:
            slot = self._free[layer].pop()
        else:
            slot = self._slot_of[layer].pop(evicted[1])
            policy.evict(evicted[1])
        self._slot_of[layer][expert] = slot
        policy.admit(expert)
        return slot, evicted
