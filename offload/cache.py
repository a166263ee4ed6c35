"""The device expert cache: K slots per layer, allocated once, and who sits where.

Mechanism only: the pool of bytes, the expert <-> slot maps, and the calls into one
eviction policy per layer (offload/policy.py decides; this file obeys). Loading bytes
into a slot is the caller's job (offload/transfer.py); eviction never writes back.

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
    """Every slot of the layer holds a pinned expert."""


class ExpertCache:
    """pool [L, K, nbytes] uint8 on the device; nothing else is ever allocated here."""

    def __init__(
        self, num_layers: int, num_experts: int, slots: int, nbytes: int,
        device: torch.device | str, policy: str = "lru",
    ):
        if not 1 <= slots <= num_experts:
            raise ValueError(f"slots per layer must be in 1..{num_experts}, got {slots}")
        self.num_layers, self.num_experts, self.slots, self.nbytes = num_layers, num_experts, slots, nbytes
        self.pool = torch.empty((num_layers, slots, nbytes), dtype=torch.uint8, device=device)
        self.allocated_bytes = self.pool.numel()  # the pool's own allocations, all of them
        self._slot_of: list[dict[int, int]] = [{} for _ in range(num_layers)]  # expert -> slot
        self._free: list[list[int]] = [list(range(slots - 1, -1, -1)) for _ in range(num_layers)]
        self.policies = [make_policy(policy, num_experts, slots) for _ in range(num_layers)]

    def buffer(self, layer: int, slot: int) -> torch.Tensor:
        return self.pool[layer, slot]

    def key(self, layer: int, slot: int) -> int:
        """A global slot number (for per-slot events)."""
        return layer * self.slots + slot

    def slot_of(self, layer: int, expert: int) -> int | None:
        return self._slot_of[layer].get(expert)

    def resident(self, layer: int) -> list[int]:
        return list(self._slot_of[layer])

    def access(self, layer: int, expert: int) -> None:
        self.policies[layer].access(expert)

    def tick(self, layer: int) -> None:
        self.policies[layer].tick()

    def can_place(self, layer: int, pinned: set[int]) -> bool:
        return bool(self._free[layer]) or any(e not in pinned for e in self._slot_of[layer])

    def place(self, layer: int, expert: int, pinned: set[int]) -> tuple[int, int | None]:
        """A slot for `expert` (not resident): a free one, else the policy's victim outside `pinned`.

        Returns (slot, evicted expert or None). The caller then loads the bytes.
        """
        if expert in self._slot_of[layer]:
            raise ValueError(f"layer {layer} expert {expert} is already resident")
        policy, evicted = self.policies[layer], None
        if self._free[layer]:
            slot = self._free[layer].pop()
        else:
            candidates = [e for e in self._slot_of[layer] if e not in pinned]
            if not candidates:
                raise CacheFull(f"layer {layer}: all {self.slots} slots hold pinned experts")
            evicted = policy.victim(candidates)
            if evicted not in candidates:
                raise RuntimeError(f"policy chose {evicted}, not one of the candidates {candidates}")
            slot = self._slot_of[layer].pop(evicted)
            policy.evict(evicted)
        self._slot_of[layer][expert] = slot
        policy.admit(expert)
        return slot, evicted
