"""The offload engine against all-resident experts: bitwise outputs, byte accounting, pool bound."""

from __future__ import annotations

import random

import pytest
import torch
from test_offload_synth import make_engine, make_experts, reference, write_checkpoint

L, E, INTER, DIM = 3, 6, 32, 16  # fp32: 2 KiB per matrix, multiples of 64 bytes (no padding)
EXPERT_BYTES = 3 * INTER * DIM * 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tensors = make_experts(L, E, INTER, DIM)
    files = write_checkpoint(tmp_path_factory.mktemp("experts"), tensors, shards=2)
    return tensors, files


def steps(seed: int, top_k: int, tokens: int, n: int):
    """n random steps: per layer (x, ids rows, weights) with distinct ids per row."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        per_layer = []
        for _ in range(L):
            ids = [rng.sample(range(E), top_k) for _ in range(tokens)]
            w = torch.softmax(torch.randn(tokens, top_k, generator=g), -1)
            per_layer.append((torch.randn(tokens, DIM, generator=g), ids, w))
        out.append(per_layer)
    return out


def drive(engine, tensors, run_steps, guess: bool):
    """Run every step through engine and reference; assert bitwise equality."""
    for per_layer in run_steps:
        for layer, (x, ids, w) in enumerate(per_layer):
            nxt = per_layer[layer + 1][1] if guess and layer + 1 < L else None
            got = engine.run(layer, x, ids, w, nxt)
            assert torch.equal(got, reference(tensors, layer, x, ids, w)), (layer, ids)


@pytest.mark.parametrize("store", ["ram", "mmap"])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("top_k,tokens", [(2, 1), (2, 5), (3, 1), (3, 4)])
def test_bitwise_equal_for_every_k(ckpt, store, prefetch, top_k, tokens):
    tensors, files = ckpt
    for slots in range(top_k, E + 1):
        engine = make_engine(files, L, E, INTER, DIM, slots=slots, store=store, prefetch=prefetch)
        drive(engine, tensors, steps(slots, top_k, tokens, 6), guess=True)


def test_prefill_with_more_experts_than_slots(ckpt):
    """A chunk needing all E experts with K = 2 slots loads each expert exactly once."""
    tensors, files = ckpt
    engine = make_engine(files, L, E, INTER, DIM, slots=2, prefetch=False)
    run_steps = steps(7, 2, 8, 1)
    for _, ids, _ in run_steps[0]:  # every expert, interleaved over tokens
        ids[:] = [[t % E, (t + 3) % E] for t in range(8)]
    drive(engine, tensors, run_steps, guess=False)
    s = engine.stats()
    assert s["expert_misses"] == L * E and max(engine.counters.loads.values()) == 1


@pytest.mark.parametrize("store", ["ram", "mmap"])
def test_bytes_accounting(ckpt, store):
    tensors, files = ckpt
    engine = make_engine(files, L, E, INTER, DIM, slots=3, store=store, prefetch=True)
    drive(engine, tensors, steps(1, 2, 1, 12), guess=True)
    s = engine.stats()
    assert s["prefetch_issued"] > 0 and s["expert_misses"] > 0
    assert s["bytes_host_to_device"] == (s["expert_misses"] + s["prefetch_issued"]) * EXPERT_BYTES
    assert sum(engine.counters.loads.values()) == s["expert_misses"] + s["prefetch_issued"]
    assert s["bytes_per_token"] == s["bytes_host_to_device"] / 12


def test_guess_equal_to_choice_is_all_hits_after_layer_0(ckpt):
    """A perfect guess serves every use past layer 0 from a slot (a hit, or a prefetch used, which is not
    counted as a hit) unless the guess was refused, and recall is exactly 1."""
    tensors, files = ckpt
    engine = make_engine(files, L, E, INTER, DIM, slots=2, prefetch=True)
    drive(engine, tensors, steps(3, 2, 1, 5), guess=True)
    s = engine.stats()
    assert s["prefetch_recall"] == 1.0
    # a guess refused (it would have evicted an expert used more often) costs at most one miss
    assert s["expert_hits"] + s["prefetch_used"] >= 2 * (L - 1) * 5 - s["prefetch_refused"]
    assert s["prefetch_used"] <= s["prefetch_issued"]
    assert s["hit_rate"] == s["expert_hits"] / (s["expert_hits"] + s["prefetch_used"] + s["expert_misses"])


def test_room_for_every_expert_loads_each_once(ckpt):
    tensors, files = ckpt
    for prefetch in (True, False):
        engine = make_engine(files, L, E, INTER, DIM, slots=E, prefetch=prefetch)
        drive(engine, tensors, steps(5, 2, 3, 10), guess=True)
        assert max(engine.counters.loads.values()) == 1


def test_pool_is_bounded_by_its_allocations(ckpt):
    tensors, files = ckpt
    for slots in (2, 4):
        engine = make_engine(files, L, E, INTER, DIM, slots=slots)
        before = engine.cache.allocated_bytes
        assert before == slots * L * EXPERT_BYTES == engine.cache.pool.numel()
        drive(engine, tensors, steps(2, 2, 4, 4), guess=True)
        s = engine.stats()
        assert engine.cache.allocated_bytes == before == s["device_expert_bytes"]
        assert all(len(engine.cache.resident(layer)) <= slots for layer in range(L))


def test_no_eviction_of_what_the_running_layer_still_needs(ckpt):
    """Spy on every placement: a victim is never an expert the running layer has yet to compute."""
    tensors, files = ckpt
    engine = make_engine(files, L, E, INTER, DIM, slots=2, prefetch=True)
    state = {"layer": None, "todo": set()}
    place, compute = engine.cache.place, engine._compute
    evictions = []

    def spy_place(layer, expert, pinned):
        slot, evicted = place(layer, expert, pinned)
        if layer == state["layer"] and evicted is not None:
            assert evicted not in state["todo"], (layer, evicted)
        evictions.append((layer == state["layer"], evicted))
        return slot, evicted

    def spy_compute(layer, expert, x, tok):
        y = compute(layer, expert, x, tok)
        state["todo"].discard(expert)
        return y

    engine.cache.place, engine._compute = spy_place, spy_compute
    for per_layer in steps(11, 2, 6, 4):  # 6 tokens x 2 choices: often more experts than slots
        for layer, (x, ids, w) in enumerate(per_layer):
            state["layer"], state["todo"] = layer, {e for row in ids for e in row}
            got = engine.run(layer, x, ids, w, per_layer[layer + 1][1] if layer + 1 < L else None)
            assert torch.equal(got, reference(tensors, layer, x, ids, w))
    assert any(same and e is not None for same, e in evictions)  # the check was exercised
    assert any(not same and e is not None for same, e in evictions)  # prefetch evicted too


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("store", ["ram", "mmap"])
def test_cuda_copy_stream_matches_resident_experts(ckpt, store):
    """Copy stream + events: the same numbers as resident experts on the same device."""
    tensors, files = ckpt
    on_gpu = {k: v.cuda() for k, v in tensors.items()}
    for slots, tokens in ((2, 1), (2, 7), (4, 3)):
        engine = make_engine(files, L, E, INTER, DIM, slots=slots, store=store, device="cuda")
        for per_layer in steps(slots + tokens, 2, tokens, 6):
            for layer, (x, ids, w) in enumerate(per_layer):
                x, w = x.cuda(), w.cuda()
                nxt = per_layer[layer + 1][1] if layer + 1 < L else None
                got = engine.run(layer, x, ids, w, nxt)
                torch.testing.assert_close(got, reference(on_gpu, layer, x, ids, w), rtol=0, atol=1e-6)
        s = engine.stats()
        assert s["bytes_host_to_device"] == (s["expert_misses"] + s["prefetch_issued"]) * EXPERT_BYTES
        assert s["stall_s"] >= 0 and engine.cache.pool.is_cuda
        assert engine.store.pinned == (store == "ram")


def test_prefetch_waits_until_every_demand_load_is_issued(ckpt):
    """Prefill with more experts than slots: layer 0's loads (in waves) all precede layer 1's guesses."""
    tensors, files = ckpt
    engine = make_engine(files, L, E, INTER, DIM, slots=2, prefetch=True)
    order = []
    load = engine._load
    engine._load = lambda layer, e, pinned: (order.append(layer), load(layer, e, pinned))[1]
    x, ids, w = steps(4, 2, 8, 1)[0][0]
    ids[:] = [[t % E, (t + 1) % E] for t in range(8)]  # all 6 experts: 3 waves of 2
    got = engine.run(0, x, ids, w, [[0, 1]] * 8)
    assert torch.equal(got, reference(tensors, 0, x, ids, w))
    assert order == [0] * E + [1, 1]


def test_wrong_guesses_stop_evicting_sticky_experts(ckpt):
    """Routing that repeats itself and a guess that is always wrong: after the first steps
    show the guess losing to repetition, prefetch no longer evicts the layer's residents."""
    tensors, files = ckpt
    g = torch.Generator().manual_seed(9)
    sticky, wrong = [0, 1], [4, 5]
    engine = make_engine(files, L, E, INTER, DIM, slots=2, prefetch=True)
    for _ in range(12):
        for layer in range(L):
            x = torch.randn(1, DIM, generator=g)
            w = torch.softmax(torch.randn(1, 2, generator=g), -1)
            engine.run(layer, x, [sticky], w, [wrong] if layer + 1 < L else None)
    s = engine.stats()
    assert s["prefetch_recall"] == 0.0
    # step 0: no evidence yet, the guess fills layers 1..L-1 and all 2L choices miss; step 1:
    # layer 1's guess is planned before any repetition was scored, so it evicts once more;
    # from then on the residents are protected and every access hits
    assert s["prefetch_issued"] == 2 * (L - 1) + 2
    assert s["expert_misses"] == 2 * L + 2
