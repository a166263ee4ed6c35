"""Misses served on the host (offload/host_experts.py) or copied: bitwise the same outputs, stats that add up."""

from __future__ import annotations

import pytest
import torch
from test_offload_engine import DIM, EXPERT_BYTES, INTER, E, L, drive, steps
from test_offload_synth import make_engine, make_experts, write_checkpoint

from offload.miss_policy import Costs, MissPolicy


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tensors = make_experts(L, E, INTER, DIM)
    return tensors, write_checkpoint(tmp_path_factory.mktemp("experts"), tensors, shards=2)


def policies():
    return {"copy": MissPolicy("copy"), "cpu": MissPolicy("cpu"),
            "mix": MissPolicy("auto", script=lambda step, hits, misses: step % (misses + 1)),
            "auto-slow-pcie": MissPolicy("auto", Costs(copy=20e-3, cpu=2e-3, gpu=0.3e-3)),
            # of two misses, one copied for its later value (tests/test_miss_policy.py), one on the host
            "auto-by-choice": MissPolicy("auto", Costs(3.76e-3, 1.32e-3, 0.31e-3, cpu_beside_copy=2.03e-3))}


def engine_with(files, policy, **kw):
    return make_engine(files, L, E, INTER, DIM, miss_policy=policy, **kw)


@pytest.mark.parametrize("store", ["ram", "mmap"])
@pytest.mark.parametrize("top_k,tokens", [(2, 1), (2, 5), (3, 4)])
@pytest.mark.parametrize("name", ["copy", "cpu", "mix", "auto-slow-pcie", "auto-by-choice"])
def test_every_miss_policy_is_bitwise_equal(ckpt, store, top_k, tokens, name):
    tensors, files = ckpt
    for slots in (top_k, E - 1):
        engine = engine_with(files, policies()[name], slots=slots, store=store, prefetch=True)
        drive(engine, tensors, steps(slots + tokens, top_k, tokens, 5), guess=True)
        s = engine.stats()
        assert s["expert_hits"] + s["expert_copies"] + s["cpu_expert_runs"] == s["expert_hits"] + s["expert_misses"]
        assert s["copies_avoided_bytes"] == s["cpu_expert_runs"] * EXPERT_BYTES
        assert s["bytes_host_to_device"] == (s["expert_copies"] + s["prefetch_issued"]) * EXPERT_BYTES
        if name == "auto-slow-pcie":  # decode steps run their misses on the CPU, prefill chunks copy
            assert (s["cpu_expert_runs"] > 0) == (tokens == 1) and (s["expert_copies"] > 0) == (tokens > 1)
        if name == "cpu":
            assert s["expert_copies"] == 0 and s["cpu_expert_runs"] == s["expert_misses"] > 0
        if name == "copy":
            assert s["cpu_expert_runs"] == 0 and s["cpu_expert_s"] == 0.0


@pytest.mark.parametrize("name", ["cpu", "mix"])
def test_host_experts_on_a_worker_thread_are_bitwise_equal(ckpt, name):
    tensors, files = ckpt
    engine = engine_with(files, policies()[name], slots=2, store="mmap", prefetch=True, host_thread=True)
    assert engine._worker is not None
    drive(engine, tensors, steps(6, 2, 1, 5), guess=True)
    drive(engine, tensors, steps(6, 2, 4, 2), guess=True)
    s = engine.stats()
    assert s["cpu_expert_runs"] > 0 and s["expert_misses"] == s["expert_copies"] + s["cpu_expert_runs"]
    engine.close()


def test_copies_by_choice_are_admitted_and_valued(ckpt):
    tensors, files = ckpt
    policy = policies()["auto-by-choice"]
    engine = engine_with(files, policy, slots=2, store="ram", prefetch=False)
    x, w = torch.randn(1, DIM), torch.tensor([[0.5, 0.5]])
    engine.run(0, x, [[0, 1]], w)  # two misses: 0 copied (by choice), 1 on the host
    assert engine.cache.resident(0) == [0] and engine.stats()["cpu_expert_runs"] == 1
    engine.run(0, x, [[0, 2]], w)  # a hit on the admitted expert; one miss: a copy would cost more than it is worth
    engine.run(0, x, [[3, 4]], w)  # 3 copied by choice into the free slot
    assert sorted(engine.cache.resident(0)) == [0, 3] and policy.value.count == 1
    engine.run(0, x, [[5, 1]], w)  # 5 displaces 0 (least recent): 0's record closes at +1
    assert sorted(engine.cache.resident(0)) == [3, 5]
    assert (policy.value.net, policy.value.count) == (policy.value.PRIOR_HITS + 1, 2)
    s = engine.stats()
    assert s["expert_hits"] == 1 and s["expert_copies"] == 3 and s["cpu_expert_runs"] == 4


def test_host_runs_are_not_admitted(ckpt):
    tensors, files = ckpt
    engine = engine_with(files, MissPolicy("cpu"), slots=2, store="ram", prefetch=False)
    x = torch.randn(1, DIM)
    engine.run(0, x, [[0, 1]], torch.tensor([[0.5, 0.5]]))
    assert engine.cache.resident(0) == [] and engine.stats()["cpu_expert_runs"] == 2


def test_uses_add_up_across_a_prefill_with_more_experts_than_slots(ckpt):
    tensors, files = ckpt
    engine = engine_with(files, policies()["mix"], slots=2, store="mmap", prefetch=False)
    run_steps = steps(7, 2, 8, 1)
    for _, ids, _ in run_steps[0]:
        ids[:] = [[t % E, (t + 3) % E] for t in range(8)]
    drive(engine, tensors, run_steps, guess=False)
    s = engine.stats()
    assert s["expert_misses"] == L * E == s["expert_copies"] + s["cpu_expert_runs"]
    assert 0 < s["cpu_expert_runs"] < L * E


def test_calibration_on_the_cpu_measures_three_positive_costs(ckpt):
    from offload.host_experts import calibrate

    _, files = ckpt
    engine = engine_with(files, MissPolicy("cpu"), slots=2, store="ram", prefetch=False)
    c = calibrate(engine.host, engine.codec, engine.expert_fn, DIM, torch.float32, torch.device("cpu"))
    assert c.copy > 0 and c.cpu > 0 and c.gpu > 0
    assert "ms/expert" in MissPolicy("auto", c).describe()


def test_calibration_times_experts_beyond_the_cache(ckpt, monkeypatch):
    """The host figure is a median over experts holding over twice the largest cache (each read from DRAM, as a
    miss's is), not one expert re-read (cache-resident wherever the L3 holds it)."""
    from offload import host_experts

    _, files = ckpt
    engine = engine_with(files, MissPolicy("cpu"), slots=2, store="ram", prefetch=False)
    seen = []
    run = engine.host.run
    monkeypatch.setattr(engine.host, "run", lambda layer, e, x: seen.append((layer, e)) or run(layer, e, x))
    monkeypatch.setattr(host_experts, "largest_cache_bytes", lambda: 3 * EXPERT_BYTES)
    host_experts.calibrate(engine.host, engine.codec, engine.expert_fn, DIM, torch.float32, torch.device("cpu"))
    assert len(set(seen)) == 7 and seen[:7] == seen[7:14]  # ceil(2 * 3) + 1 experts, a warm pass, a timed one
    monkeypatch.setattr(host_experts, "largest_cache_bytes", lambda: 100 * L * E * EXPERT_BYTES)
    assert len(host_experts.beyond_cache(engine.host)) == L * E  # a store smaller than the cache: all of it
