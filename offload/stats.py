"""The counters every offloaded run reports."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class OffloadStats:
    tokens: int = 0  # tokens that went through layer 0
    hits: int = 0  # needed experts already resident (including ones a prefetch brought)
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
        needed = self.hits + self.misses
        return {
            "expert_hits": self.hits,
            "expert_misses": self.misses,
            "expert_copies": self.copies,
            "cpu_expert_runs": self.cpu_runs,
            "cpu_expert_s": self.cpu_s,
            "copies_avoided_bytes": self.copies_avoided_bytes,
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
