"""The model with offloaded experts equals the all-resident model: tokens and fp32 logits, bitwise."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest
import torch

from mixtral_lite.generation.decode import generate
from mixtral_lite.model.config import ModelConfig
from mixtral_lite.runtime import budget, offloading, sizing
from mixtral_lite.runtime.flags import add_model_args, live_policies
from mixtral_lite.runtime.load import load_model
from mixtral_lite.runtime.plan import plan_load

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 28770, 28723, 851, 349, 264, 1369]  # 13 tokens


def greedy_logits(model, prompt: list[int], n: int, chunk: int = 5) -> tuple[list[int], torch.Tensor]:
    """Chunked prefill then n greedy decode steps; every step's last-row logits [n, V]."""
    cache = model.new_cache(1, 64)
    cache.reset(torch.zeros(1, dtype=torch.long))
    tokens = torch.tensor([prompt])
    for start in range(0, len(prompt), chunk):
        logits = model(tokens[:, start : start + chunk], cache)
    out, rows = [], []
    for _ in range(n):
        rows.append(logits[0, -1])
        nxt = int(rows[-1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache)
    return out, torch.stack(rows)


@pytest.fixture(scope="module")
def resident(mixtral_ref):
    _, path = mixtral_ref
    model = load_model(path)
    return path, greedy_logits(model, PROMPT, 12)


@pytest.mark.parametrize("store,prefetch,pool", list(itertools.product(["ram", "mmap"], [True, False],
                                                                        ["layer", "global"])))
def test_offloaded_equals_resident_for_every_k(resident, store, prefetch, pool):
    path, (want_tokens, want_logits) = resident
    cfg = ModelConfig.from_dir(path)
    for k in range(cfg.experts_per_tok, cfg.num_experts + 1):
        factory = offloading.make_factory(slots=k, store=store, prefetch=prefetch, pool=pool)
        model = load_model(path, experts=factory)
        tokens, logits = greedy_logits(model, PROMPT, 12)
        assert tokens == want_tokens, (k, store, prefetch)
        assert torch.equal(logits, want_logits), (k, store, prefetch)
        s = model.experts.stats()
        assert s["expert_hits"] + s["expert_misses"] > 0
        assert s["device_expert_bytes"] == k * cfg.num_layers * s["expert_bytes"]
        assert s["bytes_host_to_device"] == (s["expert_misses"] + s["prefetch_issued"]) * s["expert_bytes"]
        assert (s["prefetch_issued"] > 0) == (prefetch and k < cfg.num_experts)  # all cached: nothing to guess
        if k == cfg.num_experts:  # room for every expert: none crosses twice
            assert max(model.experts.engine.counters.loads.values()) == 1


@pytest.mark.parametrize("store", ["ram", "mmap"])
def test_bf16_compute_from_fp32_checkpoint_is_bitwise_equal(mixtral_ref, store):
    """The codec converts fp32 slots into bf16 scratch; sums mirror the resident bf16 path."""
    _, path = mixtral_ref
    want = greedy_logits(load_model(path, dtype=torch.bfloat16), PROMPT, 6)
    model = load_model(path, dtype=torch.bfloat16, experts=offloading.make_factory(slots=2, store=store))
    got = greedy_logits(model, PROMPT, 6)
    assert got[0] == want[0] and torch.equal(got[1], want[1])


def test_batched_generate_equal_with_offloading(mixtral_ref):
    _, path = mixtral_ref
    prompts = [PROMPT, PROMPT[:6]]
    want = generate(load_model(path), prompts, 10, window=64)
    model = load_model(path, experts=offloading.make_factory(slots=2, store="mmap"))
    assert generate(model, prompts, 10, window=64) == want


def parse(*argv: str):
    p = argparse.ArgumentParser()
    add_model_args(p)
    return p.parse_args(list(argv))


def build(path, *argv: str):
    """The experts factory generate would load `path` with, on the CPU, given these flags."""
    plan = plan_load(parse("-m", str(path), "--device", "cpu", *argv))
    return offloading.build(plan, sizing.decide(plan)[1])


def test_build_turns_offloading_on_only_when_asked(mixtral_ref):
    _, path = mixtral_ref
    assert build(path) is None
    assert build(path, "--experts-per-layer", "4") is None
    factory = build(path, "--experts-per-layer", "3", "--store", "mmap", "--prefetch", "off")
    model = load_model(path, experts=factory)
    assert not model.experts.wants_guess and model.experts.engine.cache.quota == 3


@pytest.mark.parametrize("argv,message", [
    (("--experts-per-layer", "1"), r"--experts-per-layer 1: must be between experts_per_tok \(2\) and "
                                   r"num_experts \(4\)"),
    (("--experts-per-layer", "5"), "--experts-per-layer 5: must be between"),
    (("--device-memory", "1", "--experts-per-layer", "2"), "either --experts-per-layer or --device-memory"),
])
def test_bad_flags_name_the_flag(mixtral_ref, argv, message):
    _, path = mixtral_ref
    with pytest.raises(SystemExit, match=message):  # when the plan is made, before anything loads
        plan_load(parse("-m", str(path), "--device", "cpu", *argv))


def test_device_memory_must_be_positive_and_finite(capsys):
    for bad in ("-1", "0", "nan", "inf"):  # refused while parsing, before anything loads
        with pytest.raises(SystemExit):
            parse("--device-memory", bad)
        assert f"--device-memory: {bad} must be a finite number > 0" in capsys.readouterr().err


def test_cache_policy_offers_live_policies_only(resident, capsys):
    assert "lru" in live_policies() and "belady" not in live_policies()
    with pytest.raises(SystemExit):
        parse("--cache-policy", "belady")
    assert "--cache-policy: invalid choice: 'belady'" in capsys.readouterr().err
    path, (want_tokens, want_logits) = resident
    for name in live_policies():  # any policy: same output, only hit rates differ
        model = load_model(path, experts=offloading.make_factory(slots=2, policy=name))
        tokens, logits = greedy_logits(model, PROMPT, 12)
        assert tokens == want_tokens and torch.equal(logits, want_logits), name


def test_device_memory_picks_k_or_says_what_it_needs(mixtral_ref, capsys):
    _, path = mixtral_ref
    cfg = ModelConfig.from_dir(path)
    dense = budget.dense_bytes(cfg, torch.float32)
    kv, act = budget.runtime_bytes(cfg, torch.float32, 4096, 512)
    expert = 3 * cfg.intermediate_size * cfg.hidden_size * 4
    for k in (2, 3):
        gib = (dense + kv + act + k * cfg.num_layers * expert + 100) / budget.GIB
        model = load_model(path, experts=build(path, "--device-memory", f"{gib!r}"))
        assert model.experts.engine.cache.quota == k
        assert f"-> {k} experts per layer" in capsys.readouterr().err
    gib = (dense + kv + act + cfg.num_layers * expert) / budget.GIB
    with pytest.raises(SystemExit, match=r"--device-memory .* GiB is too small: dense weights .* needs at least"):
        build(path, "--device-memory", f"{gib!r}")  # when the plan is made, before anything loads


@pytest.mark.parametrize("store", ["ram", "mmap"])
def test_a_budget_between_k_and_k_plus_1_fills_one_pool_and_equals_resident(resident, store, capsys):
    """2.5 slots a layer of budget: per layer, 2 and the rest idle; one pool, every slot but less than one used.
    Greedy tokens and logits equal the resident model's either way; the run's pool is the plan's."""
    path, (want_tokens, want_logits) = resident
    cfg = ModelConfig.from_dir(path)
    dense = budget.dense_bytes(cfg, torch.float32)
    kv, act = budget.runtime_bytes(cfg, torch.float32, 4096, 512)
    expert = 3 * cfg.intermediate_size * cfg.hidden_size * 4
    gib = (dense + kv + act + 2.5 * cfg.num_layers * expert) / budget.GIB
    slots = {}
    for pool in ("layer", "global"):
        model = load_model(path, experts=build(path, "--device-memory", f"{gib!r}", "--store", store,
                                               "--expert-pool", pool))
        tokens, logits = greedy_logits(model, PROMPT, 12)
        assert tokens == want_tokens and torch.equal(logits, want_logits), pool
        s = model.experts.stats()
        slots[pool] = s["pool_slots"]
        assert s["expert_pool"] == pool and s["device_expert_bytes"] == s["pool_slots"] * s["expert_bytes"]
    assert slots == {"layer": 2 * cfg.num_layers, "global": int(2.5 * cfg.num_layers)}
    assert f"-> {int(2.5 * cfg.num_layers)} expert slots shared by every layer (at least 2 each)" in (
        capsys.readouterr().err)


def test_dense_model_rejects_expert_flags(mistral_ref):
    _, path = mistral_ref
    assert build(path) is None
    with pytest.raises(SystemExit, match="--experts-per-layer: the model is dense"):
        build(path, "--experts-per-layer", "2")
    with pytest.raises(SystemExit, match="--device-memory 0.001 GiB is too small for the dense model"):
        build(path, "--device-memory", "0.001")


OFFLOAD_KEYS = {"expert_hits", "expert_misses", "hit_rate", "prefetch_issued", "prefetch_used", "prefetch_recall",
                "bytes_host_to_device", "bytes_per_token", "stall_s", "device_expert_bytes"}


@pytest.mark.parametrize("flags", [("--experts-per-layer", "2", "--store", "mmap"),
                                   ("--experts-per-layer", "3", "--prefetch", "off", "--cache-policy", "lfu")])
def test_cli_offloaded_run_prints_the_same_text_and_reports_stats(mixtral_ref, tmp_path, capsys, flags):
    from mixtral_lite.cli.generate import main

    _, path = mixtral_ref
    base = ["-m", str(path), "-p", "It is a truth", "-n", "8", "--temperature", "0", "--ignore-eos"]
    main([*base, "--stats-json", str(tmp_path / "resident.json")])
    resident = capsys.readouterr().out
    main([*base, *flags, "--stats-json", str(tmp_path / "offload.json")])
    assert capsys.readouterr().out == resident
    stats = json.loads((tmp_path / "offload.json").read_text())
    assert OFFLOAD_KEYS <= set(stats)
    k = int(flags[1])
    assert stats["device_expert_bytes"] == k * 3 * 3 * 64 * 96 * 4  # K x layers x (w1, w2, w3 fp32)
    assert stats["bytes_host_to_device"] == (stats["expert_misses"] + stats["prefetch_issued"]) * 3 * 64 * 96 * 4
    assert (stats["prefetch_recall"] is None) == ("off" in flags)
    resident_stats = json.loads((tmp_path / "resident.json").read_text())
    assert "hit_rate" not in resident_stats
    assert resident_stats["device_expert_bytes"] == 4 * 3 * 3 * 64 * 96 * 4  # every expert resident


def test_cpu_slots_hold_the_compute_dtype():
    """A bf16 checkpoint computed in fp32 on the CPU: each expert is converted once, when it is
    loaded into a slot, and a cache hit uses the slot in place. The host store keeps the file's
    bf16 (that is what the byte counters count); the pool is K x L fp32 experts. Every store
    gives the resident model's logits bitwise."""
    from mixtral_lite import default_model_path

    path = default_model_path()  # the shipped model: bf16 on disk
    cfg = ModelConfig.from_dir(path)
    want = greedy_logits(load_model(path), PROMPT, 4)
    fp32_expert = 3 * cfg.hidden_size * cfg.intermediate_size * 4
    for store in ("ram", "mmap"):
        model = load_model(path, experts=offloading.make_factory(slots=4, store=store))
        engine = model.experts.engine
        assert {e.dtype for e in engine.store.layout.entries} == {"bfloat16"}, store
        slot_views = engine._views[0]
        mats = engine.codec.decode(slot_views)
        assert all(m.dtype == torch.float32 for m in mats)
        assert engine.codec.names == ("w13", "w2")  # w1 and w3 back to back: one product per decoding token
        assert [m.data_ptr() for m in mats] == [slot_views[n].data_ptr() for n in ("w1", "w2")]  # in place
        got = greedy_logits(model, PROMPT, 4)
        assert got[0] == want[0] and torch.equal(got[1], want[1]), store
        s = model.experts.stats()
        assert s["expert_bytes"] == fp32_expert // 2  # bf16 bytes move per load
        assert s["bytes_host_to_device"] == (s["expert_misses"] + s["prefetch_issued"]) * s["expert_bytes"]
        assert s["device_expert_bytes"] == 4 * cfg.num_layers * fp32_expert


def test_expert_pool_default_follows_the_policy_and_markov_is_per_layer_only(resident):
    path, _ = resident
    assert plan_load(parse("-m", str(path), "--device", "cpu")).experts.expert_pool == "global"
    assert plan_load(parse("-m", str(path), "--device", "cpu", "--cache-policy", "lfu")).experts.expert_pool == "layer"
    with pytest.raises(SystemExit, match="--expert-pool global: takes --cache-policy lru or lfu, not markov"):
        build(path, "--experts-per-layer", "2", "--expert-pool", "global", "--cache-policy", "markov")
    with pytest.raises(SystemExit):
        parse("--expert-pool", "ring")
