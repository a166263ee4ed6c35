"""Where a missed expert runs: copied into a slot, or computed on the CPU beside the host store.

The model of one layer (seconds, per expert):
    copy   host -> device copy of one packed expert (one copy stream: copies serialize)
    cpu    one expert on the host's fused kernel (the host experts serialize on their threads)
    gpu    one expert computed on the device from a slot
With h hits and m misses of which c are copied and m - c run on the CPU, the device computes the
hits while the first copy lands, and each copied expert after its copy: the device side ends at
    device(c) = max(h * gpu, copy) + (c - 1) * max(copy, gpu) + gpu       (c >= 1)
              = h * gpu                                                   (c == 0)
(the copies are a pipeline: each expert's compute follows its copy, the slowest stage sets the pace).
The host side ends at (m - c) * cpu; both run at once, so the layer ends at the larger of the two.
`split` tries every c and keeps the soonest (ties: more copies, which also warm the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

MISS_POLICIES = ("auto", "copy", "cpu")


@dataclass(frozen=True)
class Costs:
    """Seconds per expert, measured at start-up (`calibrate`) or injected by a test."""

    copy: float
    cpu: float
    gpu: float

    def describe(self) -> str:
        return (f"cost model: copy {self.copy * 1e3:.2f} ms/expert, cpu {self.cpu * 1e3:.2f} ms/expert, "
                f"device {self.gpu * 1e3:.2f} ms/expert")


def device_time(hits: int, copies: int, c: Costs) -> float:
    """When the device finishes the hits and `copies` copied misses (see the module docstring)."""
    if copies == 0:
        return hits * c.gpu
    return max(hits * c.gpu, c.copy) + (copies - 1) * max(c.copy, c.gpu) + c.gpu


def layer_time(hits: int, misses: int, copies: int, c: Costs) -> float:
    return max(device_time(hits, copies, c), (misses - copies) * c.cpu)


def split(hits: int, misses: int, c: Costs) -> int:
    """How many of the layer's misses to copy so the layer ends soonest (the rest run on the CPU)."""
    best, best_t = misses, layer_time(hits, misses, misses, c)
    for copies in range(misses - 1, -1, -1):
        t = layer_time(hits, misses, copies, c)
        if t < best_t * (1 - 1e-9):  # strictly sooner: ties keep the copies
            best, best_t = copies, t
    return best


class MissPolicy:
    """Per layer, how many misses to copy: all (copy), none (cpu), or the cost model's split (auto).

    script: a test's callable (call number, hits, misses) -> copies, called once per layer call,
    to force a mix whatever the costs.
    """

    def __init__(self, mode: str = "copy", costs: Costs | None = None, script=None):
        if mode not in MISS_POLICIES:
            raise ValueError(f"miss policy {mode!r}: choose one of {', '.join(MISS_POLICIES)}")
        if mode == "auto" and costs is None and script is None:
            raise ValueError("miss policy auto needs costs (calibrate) or a script")
        self.mode, self.costs, self.script = mode, costs, script
        self._step = 0

    def copies(self, hits: int, misses: int, rows: int = 1) -> int:
        """Number of the misses (taken in order) to copy into slots; rows: tokens in the step."""
        if self.script is not None:
            n = self.script(self._step, hits, misses)
            self._step += 1
            return max(0, min(misses, n))
        # the costs are one decoding token's; a prefill chunk's experts are compute-bound on the CPU
        if self.mode == "copy" or misses == 0 or (self.mode == "auto" and rows > 1):
            return misses
        if self.mode == "cpu":
            return 0
        return split(hits, misses, self.costs)

    def describe(self) -> str:
        if self.script is not None:
            return "miss policy: scripted"
        text = f"miss policy: {self.mode}"
        return f"{text}; {self.costs.describe()}" if self.costs is not None else text
