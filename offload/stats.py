"""The counters every offloaded run reports."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class OffloadStats:
    tokens: int = 0  # tokens that went through layer 0
    hits: int = 0  # needed experts already resident (including ones a prefetch brought)
    misses: int = 0  # needed experts loaded on demand
    loads: Counter = field(default_factory=Counter)  # (layer, expert) -> times copied to the device

    def report(self, *, bytes_h2d: int, stall_s: float, pool_bytes: int, expert_bytes: int,
               prefetch_issued: int, prefetch_used: int, prefetch_recall: float | None,
               host_copy_s: float = 0.0) -> dict:
        """The stats dict merged into `generate`'s --stats-json (names are the documented keys)."""
        needed = self.hits + self.misses
        return {
            "expert_hits": self.hits,
            "expert_misses": self.misses,
            "hit_rate": self.hits / needed if needed else None,
            "prefetch_issued": prefetch_issued,
            "prefetch_used": prefetch_used,
            "prefetch_recall": prefetch_recall,
            "prefetch_wasted_bytes": (prefetch_issued - prefetch_used) * expert_bytes,
            "bytes_host_to_device": bytes_h2d,
            "bytes_per_token": bytes_h2d / self.tokens if self.tokens else None,
            "stall_s": stall_s,
            "host_copy_s": host_copy_s,  # CUDA copy thread's time reading pageable (mmapped) experts
            "device_expert_bytes": pool_bytes,
            "expert_bytes": expert_bytes,
        }
