"""Where a missed expert runs: copied into a slot, or computed on the CPU beside the host store.

The model of one layer (seconds, per expert):
    copy             host -> device copy of one packed expert (one copy stream: copies serialize)
    cpu              one expert on the host's fused kernel (the host experts serialize on their threads)
    gpu              one expert computed on the device from a slot
    cpu_beside_copy  one host expert while a copy runs: the copy's DMA reads the same DRAM, so on a
                     bandwidth-bound host it is slower than `cpu` (None: no contention)
With h hits and m misses of which c are copied and m - c run on the CPU, the device computes the
hits while the first copy lands, and each copied expert after its copy: the device side ends at
    device(c) = max(h * gpu, copy) + (c - 1) * max(copy, gpu) + gpu       (c >= 1)
              = h * gpu                                                   (c == 0)
(the copies are a pipeline: each expert's compute follows its copy, the slowest stage sets the pace).
The host side runs its m - c experts at the `cpu_beside_copy` pace while the copies stream (the first
c * copy seconds), at the `cpu` pace after; both sides run at once, so the layer ends at the later.

A copy also admits the expert to the cache, which a host run does not: the cache keeps learning.
`split` therefore minimises layer time - value x copies, where `value` is what one admission saves
later. `AdmissionValue` measures it online: for each copy the layer's own time did not ask for (an
"optional" one), the hits it gets while resident, minus the requests for the expert it displaced in
that time; each net hit saves one host run (`cpu` seconds). The estimate starts at 2 net hits an
admission, so that a policy that has never copied by choice still tries (benchmarks/project_gpu.py:
on the real routing traces this stays within 3% of the best fixed value on 8 described machines).
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
    cpu_beside_copy: float | None = None

    def describe(self) -> str:
        beside = "" if self.cpu_beside_copy is None else f" ({self.cpu_beside_copy * 1e3:.2f} beside a copy)"
        return (f"cost model: copy {self.copy * 1e3:.2f} ms/expert, cpu {self.cpu * 1e3:.2f} ms/expert{beside}, "
                f"device {self.gpu * 1e3:.2f} ms/expert")


def device_time(hits: int, copies: int, c: Costs) -> float:
    """When the device finishes the hits and `copies` copied misses (see the module docstring)."""
    if copies == 0:
        return hits * c.gpu
    return max(hits * c.gpu, c.copy) + (copies - 1) * max(c.copy, c.gpu) + c.gpu


def host_time(runs: int, copies: int, c: Costs) -> float:
    """When the host finishes `runs` experts while `copies` copies stream (see the module docstring)."""
    slow = c.cpu if c.cpu_beside_copy is None else c.cpu_beside_copy
    streaming = copies * c.copy
    if runs * slow <= streaming:
        return runs * slow
    return streaming + (runs - streaming / slow) * c.cpu


def layer_time(hits: int, misses: int, copies: int, c: Costs) -> float:
    return max(device_time(hits, copies, c), host_time(misses - copies, copies, c))


def split(hits: int, misses: int, c: Costs, value: float = 0.0) -> int:
    """How many of the layer's misses to copy (the rest run on the CPU): the soonest layer, each copy
    credited `value` seconds saved later. Ties keep the copies."""
    best, best_t = misses, layer_time(hits, misses, misses, c) - value * misses
    for copies in range(misses - 1, -1, -1):
        t = layer_time(hits, misses, copies, c) - value * copies
        if t < best_t - 1e-9 * abs(best_t):  # strictly sooner
            best, best_t = copies, t
    return best


class AdmissionValue:
    """Net hits per optional admission, measured online (see the module docstring). The expert an admission
    displaced may be another layer's (one slot pool for every layer): both are (layer, expert)."""

    PRIOR_HITS = 2.0

    def __init__(self):
        self.net, self.count = self.PRIOR_HITS, 1
        self._open: dict[tuple[int, int], list] = {}  # admitted (layer, expert) -> [displaced or None, net]

    def per_admission(self) -> float:
        return max(self.net, 0.0) / self.count

    def used(self, layer: int, experts) -> None:
        """The layer's step uses `experts` (call before this step's loads)."""
        for (lay, expert), record in self._open.items():
            gained = lay == layer and expert in experts
            lost = record[0] is not None and record[0][0] == layer and record[0][1] in experts
            record[1] += gained - lost

    def admitted(self, layer: int, expert: int, displaced: tuple[int, int] | None) -> None:
        self._open[(layer, expert)] = [displaced, 0]

    def evicted(self, layer: int, expert: int) -> None:
        record = self._open.pop((layer, expert), None)
        if record is not None:
            self.net += record[1]
            self.count += 1

    def settle(self) -> None:
        """Count every admission still resident (the end of a replayed sequence)."""
        for key in list(self._open):
            self.evicted(*key)


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
        self.value = AdmissionValue()
        self._step = 0

    def plan(self, hits: int, misses: int, rows: int = 1) -> tuple[int, int]:
        """(copies, optional): copy the first `copies` misses (taken in order), of which the last
        `optional` are copied for their later value, not for this layer's time; rows: tokens in the step."""
        if self.script is not None:
            n = self.script(self._step, hits, misses)
            self._step += 1
            return max(0, min(misses, n)), 0
        # the costs are one decoding token's; a prefill chunk's experts are compute-bound on the CPU
        if self.mode == "copy" or misses == 0 or (self.mode == "auto" and rows > 1):
            return misses, 0
        if self.mode == "cpu":
            return 0, 0
        now = split(hits, misses, self.costs)
        n = split(hits, misses, self.costs, self.value.per_admission() * self.costs.cpu)
        return n, max(n - now, 0)

    def would_copy(self, hits: int, misses: int) -> int:
        """How many of a decoding step's `misses` this policy would copy (no side effects): the most a prefetch
        may load for that step, since a miss the CPU would run costs no bus time to begin with."""
        if self.mode == "cpu":
            return 0
        if self.mode == "copy" or self.script is not None or misses == 0:
            return misses
        return split(hits, misses, self.costs, self.value.per_admission() * self.costs.cpu)

    def host_possible(self, rows: int) -> bool:
        """Whether a step of `rows` tokens may run a miss on the host (its rows then go to the host)."""
        return self.mode == "cpu" or self.script is not None or (self.mode == "auto" and rows == 1)

    def describe(self) -> str:
        if self.script is not None:
            return "miss policy: scripted"
        text = f"miss policy: {self.mode}"
        return f"{text}; {self.costs.describe()}" if self.costs is not None else text
