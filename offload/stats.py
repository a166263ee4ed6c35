"""The counters every offloaded run reports.

What each figure means (the same for the copy engine here and the table engine, offload/table.py):
    expert uses      hits + prefetch used + misses: every (token, layer, expert) the router chose, per step
    hit              a use served from a slot with no transfer for it this token
    prefetch used    a use served from a slot a prefetch filled for this step (its bytes crossed the bus
                     this token, speculatively); prefetch wasted: issued - used
    miss             neither: copied on demand (copies), run on the host (cpu_runs), or (table engine)
                     read in place over the bus by the kernel
Bytes per token, by whom they crossed the bus: demand misses, prefetches used, prefetches wasted, misses
read in place, admissions (table engine: a miss copied into a slot for later steps).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def bus_figures(tokens: int, hits: int, misses: int, fresh: int, **bytes_by_kind: int) -> dict:
    """hit_rate over every use (fresh: uses a prefetch served), and each kind of bus bytes in all and per
    token (keys `<kind>_bytes`, `<kind>_bytes_per_token`)."""
    uses = hits + misses + fresh
    out = {"expert_uses": uses, "hit_rate": hits / uses if uses else None}
    for kind, n in bytes_by_kind.items():
        out[f"{kind}_bytes"] = n
        out[f"{kind}_bytes_per_token"] = n / tokens if tokens else None
    return out


@dataclass
class OffloadStats:
    tokens: int = 0  # tokens that went through layer 0
    hits: int = 0  # needed experts in a slot with no transfer for them this token (not ones a prefetch brought)
    misses: int = 0  # needed experts not resident: copied on demand (copies) or run on the host (cpu_runs)
    copies: int = 0
    cpu_runs: int = 0
    cpu_s: float = 0.0  # wall time of the host experts themselves (on their thread beside a GPU)
    copies_avoided_bytes: int = 0  # packed bytes the host runs did not copy
    loads: Counter = field(default_factory=Counter)  # (layer, expert) -> times copied to the device

    def report(self, *, bytes_h2d: int, stall_s: float, pool_bytes: int, expert_bytes: int,
               prefetch_issued: int, prefetch_used: int, prefetch_recall: float | None,
               host_copy_s: float = 0.0) -> dict:
        """The stats dict merged into `generate`'s --stats-json (names are the documented keys)."""
        wasted = prefetch_issued - prefetch_used
        return {
            "expert_hits": self.hits,
            "expert_misses": self.misses,
            "expert_copies": self.copies,
            "cpu_expert_runs": self.cpu_runs,
            "cpu_expert_s": self.cpu_s,
            "copies_avoided_bytes": self.copies_avoided_bytes,
            "prefetch_issued": prefetch_issued,
            "prefetch_used": prefetch_used,
            "prefetch_wasted": wasted,
            "prefetch_recall": prefetch_recall,
            "bytes_host_to_device": bytes_h2d,
            "bytes_per_token": bytes_h2d / self.tokens if self.tokens else None,
            "stall_s": stall_s,
            "host_copy_s": host_copy_s,  # CUDA copy thread's time reading pageable (mmapped) experts
            "device_expert_bytes": pool_bytes,
            "expert_bytes": expert_bytes,
        } | bus_figures(self.tokens, self.hits, self.misses, prefetch_used,
                        demand_miss=self.copies * expert_bytes, prefetch_used=prefetch_used * expert_bytes,
                        prefetch_wasted=wasted * expert_bytes)
