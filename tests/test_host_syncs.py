"""Host-sync budget: at most layers + 1 synchronisations per decoded token, greedy and sampled.

Counted on the CPU: every `offload.hostsync.to_host` read (the provider's ids, generation's token),
plus every aten op that synchronises on CUDA (`.item()`/`int()`/`bool()` of a tensor, multinomial's
host checks, nonzero and other data-dependent shapes), seen through a dispatch mode.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixtral_lite.generation.decode import generate_stream
from mixtral_lite.model.config import ModelConfig
from mixtral_lite.runtime import offloading
from mixtral_lite.runtime.load import load_model
from offload.hostsync import observe

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705]
# ops whose CUDA kernels make the host wait, and how many times
SYNCING = {"_local_scalar_dense": 1, "item": 1, "multinomial": 2, "nonzero": 1, "masked_select": 1, "unique_dim": 1,
           "_unique2": 1, "repeat_interleave": 1, "is_nonzero": 1}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += SYNCING.get(func.__name__.split(".")[0], 0)
        return func(*args, **(kwargs or {}))

    def host_read(self, t: torch.Tensor) -> None:
        self.n += 1


def syncs(model, n: int, **sampling) -> int:
    counter = SyncCounter()
    with counter, observe(counter.host_read):
        for _ in generate_stream(model, [PROMPT], n, window=64, chunk=4, **sampling):
            pass
    return counter.n


def per_token(model, **sampling) -> float:
    """Syncs per decoded token: runs of 1 and 9 tokens differ by 8 decode steps."""
    return (syncs(model, 9, **sampling) - syncs(model, 1, **sampling)) / 8


MODES = {"greedy": {}, "sampled": {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 3}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("experts", ["resident", "ram", "mmap", "mmap-no-prefetch"])
def test_at_most_layers_plus_one_syncs_per_token(mixtral_ref, experts, mode):
    _, path = mixtral_ref
    layers = ModelConfig.from_dir(path).num_layers
    factory = None
    if experts != "resident":
        factory = offloading.make_factory(slots=2, store=experts.split("-")[0], prefetch="no-prefetch" not in experts)
    model = load_model(path, experts=factory)
    assert per_token(model, **MODES[mode]) <= layers + 1


class OneSyncPerExpert:
    """A provider that reads each chosen expert id on its own: what the budget must catch."""

    def __init__(self, inner):
        self.inner = inner
        self.wants_guess = inner.wants_guess

    def run(self, layer, x, ids, weights, next_guess=None):
        for e in ids[0]:
            int(e)
        return self.inner.run(layer, x, ids, weights, next_guess)

    def stats(self):
        return self.inner.stats()


def test_an_extra_sync_per_expert_breaks_the_budget(mixtral_ref):
    _, path = mixtral_ref
    cfg = ModelConfig.from_dir(path)
    model = load_model(path)
    model.experts = OneSyncPerExpert(model.experts)
    assert per_token(model) == cfg.num_layers * (1 + cfg.experts_per_tok) + 1 > cfg.num_layers + 1
