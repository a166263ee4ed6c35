"""The copy engine over one slot pool for every layer, and its honest figures and budgeted prefetch, on
scripted routing: outputs bitwise equal to all-resident experts for every miss policy, ram and mmap; hits
never include what a prefetch brought; a prefetch never displaces a more-used expert, issues nothing when
misses run on the CPU, and stays within its byte budget. Run with --fake-cuda for the stream ordering."""

from __future__ import annotations

import pytest
import torch
from test_hybrid import policies
from test_offload_engine import DIM, EXPERT_BYTES, INTER, E, L, drive, steps
from test_offload_synth import make_engine, make_experts, reference, write_checkpoint

from offload.miss_policy import Costs, MissPolicy
from offload.prefetch import PrefetchBudget

# per step, per layer: the layer's top-2 and the guess for the next layer (what the next layer's router said)
SCRIPT = [
    [([0, 1], [0, 1]), ([0, 1], [0, 1]), ([0, 1], None)],
    [([0, 1], [0, 1]), ([0, 1], [0, 1]), ([0, 1], None)],
    [([2, 3], [2, 3]), ([4, 5], [0, 1]), ([0, 1], None)],  # layer 1's guess is wrong
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tensors = make_experts(L, E, INTER, DIM)
    return tensors, write_checkpoint(tmp_path_factory.mktemp("experts"), tensors, shards=2)


def play(engine, tensors, script=SCRIPT, after=None):
    """Run the script one token at a time, checking each output against the resident experts."""
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([[0.6, 0.4]])
    for t, per_layer in enumerate(script):
        for layer, (ids, guess) in enumerate(per_layer):
            x = torch.randn(1, DIM, generator=g)
            got = engine.run(layer, x, [ids], w, None if guess is None else [guess])
            assert torch.equal(got, reference(tensors, layer, x, [ids], w)), (t, layer)
            if after is not None:
                after(t, layer, engine)


@pytest.mark.parametrize("store", ["ram", "mmap"])
@pytest.mark.parametrize("top_k,tokens", [(2, 1), (2, 5), (3, 4)])
@pytest.mark.parametrize("name", ["copy", "cpu", "mix", "auto-slow-pcie", "auto-by-choice"])
def test_the_pool_is_bitwise_equal_for_every_miss_policy(ckpt, store, top_k, tokens, name):
    tensors, files = ckpt
    for slots in (top_k * L, top_k * L + 1, L * E - 1):  # as per layer, a spare slot, all but one
        engine = make_engine(files, L, E, INTER, DIM, slots=slots, store=store, prefetch=True,
                             miss_policy=policies()[name], pool="global")
        run_steps = steps(slots + tokens, top_k, tokens, 5)
        drive(engine, tensors, run_steps, guess=True)
        s = engine.stats()
        assert s["expert_pool"] == "global" and s["pool_slots"] == slots
        assert s["expert_misses"] == s["expert_copies"] + s["cpu_expert_runs"]
        uses = sum(len({e for row in ids for e in row}) for per_layer in run_steps for _, ids, _ in per_layer)
        assert s["expert_uses"] == s["expert_hits"] + s["prefetch_used"] + s["expert_misses"] == uses
        engine.close()


def test_prefill_through_a_small_pool_loads_each_expert_once(ckpt):
    tensors, files = ckpt
    engine = make_engine(files, L, E, INTER, DIM, slots=2 * L, prefetch=False, pool="global")
    run_steps = steps(7, 2, 8, 1)
    for _, ids, _ in run_steps[0]:  # every expert of every layer, with 2 slots' worth per layer
        ids[:] = [[t % E, (t + 3) % E] for t in range(8)]
    drive(engine, tensors, run_steps, guess=False)
    assert engine.stats()["expert_misses"] == L * E and max(engine.counters.loads.values()) == 1


@pytest.mark.parametrize("pool,slots", [("layer", 3), ("global", 3 * L)])
def test_scripted_counts_hits_prefetches_and_bytes(ckpt, pool, slots):
    """Counted by hand from SCRIPT with 3 slots a layer (the pool at 3 x L behaves the same):
    step 0: L0 2 misses; L1's 2 and L2's 2 prefetched into free slots and used: 4 prefetch used, 0 hits
    step 1: 6 hits (a prefetched expert used again is a hit: no transfer for it this token)
    step 2: L0 2 misses; L1's guess 2 takes the free slot, guess 3 would evict 0 or 1 (used twice, 3 never):
            refused; L1 uses 4, 5: 2 misses, guess 2 wasted; L2 2 hits"""
    tensors, files = ckpt
    engine = make_engine(files, L, E, INTER, DIM, slots=slots, store="ram", prefetch=True, pool=pool)

    def check(t, layer, eng):
        if (t, layer) == (2, 0):  # the refused guess left layer 1's more-used experts in place
            assert eng.cache.slot_of(1, 3) is None and eng.cache.slot_of(1, 2) is not None
            assert eng.cache.slot_of(1, 0) is not None and eng.cache.slot_of(1, 1) is not None
    play(engine, tensors, after=check)
    s = engine.stats()
    assert (s["expert_hits"], s["prefetch_used"], s["expert_misses"], s["expert_uses"]) == (8, 4, 6, 18)
    assert s["hit_rate"] == 8 / 18
    assert (s["prefetch_issued"], s["prefetch_wasted"], s["prefetch_refused"]) == (5, 1, 1)
    assert (s["demand_miss_bytes"], s["prefetch_used_bytes"], s["prefetch_wasted_bytes"]) == (
        6 * EXPERT_BYTES, 4 * EXPERT_BYTES, EXPERT_BYTES)
    assert s["bytes_host_to_device"] == 11 * EXPERT_BYTES
    assert s["demand_miss_bytes_per_token"] == 6 * EXPERT_BYTES / 3


def test_no_prefetch_for_misses_the_cpu_runs(ckpt):
    tensors, files = ckpt
    for pool, slots in (("layer", 3), ("global", 3 * L)):
        engine = make_engine(files, L, E, INTER, DIM, slots=slots, prefetch=True, pool=pool,
                             miss_policy=MissPolicy("cpu"))
        play(engine, tensors)
        s = engine.stats()
        assert s["prefetch_issued"] == 0 and s["bytes_host_to_device"] == 0 and s["cpu_expert_runs"] == 18
        # auto when the CPU ends every layer sooner: a copy (or a prefetch) would cost more than it saves
        cpu_wins = MissPolicy("auto", Costs(copy=50e-3, cpu=1e-3, gpu=0.3e-3))
        assert cpu_wins.would_copy(0, 2) == 0
        engine = make_engine(files, L, E, INTER, DIM, slots=slots, prefetch=True, pool=pool, miss_policy=cpu_wins)
        play(engine, tensors)
        assert engine.stats()["prefetch_issued"] == 0


def test_the_byte_budget_caps_what_is_issued(ckpt):
    """copy = gpu = 1 s an expert: a layer step with 2 demand copies keeps the device busy 3 s and the bus 2 s,
    so one expert's bytes of prefetch fit; with 1 hit and 1 copy, again one."""
    tensors, files = ckpt
    budget = PrefetchBudget(Costs(copy=1.0, cpu=1.0, gpu=1.0), EXPERT_BYTES)
    assert budget.bytes(0, 2) == EXPERT_BYTES and budget.experts(1, 1) == 1 and budget.experts(0, 0) == 0
    issued = []

    def count(t, layer, eng):
        issued.append(eng.prefetcher.issued)
    engine = make_engine(files, L, E, INTER, DIM, slots=3, prefetch=True, prefetch_budget=budget)
    play(engine, tensors, after=count)
    per_step = [b - a for a, b in zip([0, *issued], issued, strict=False)]
    assert max(per_step) == 1 and engine.stats()["prefetch_issued"] == 3  # 5 without the budget
    assert engine.stats()["prefetch_refused"] == 0  # step 2's second guess never came up: the budget stopped it
