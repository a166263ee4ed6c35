"""The model with misses run on the host, copied, or a scripted mix: the resident model's logits, bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from test_fused import PROMPTS, _logits, fused_store  # noqa: F401  (the module's fixture)
from test_offload_model import PROMPT, greedy_logits, parse

from mixtral_lite.model.config import ModelConfig
from mixtral_lite.runtime import offloading
from mixtral_lite.runtime.load import load_model
from offload.miss_policy import MissPolicy


def policy(name: str):
    if name == "mix":  # a different split at every layer call
        return MissPolicy("auto", script=lambda step, hits, misses: step % (misses + 1))
    return name


@pytest.fixture(scope="module")
def resident(mixtral_ref):
    _, path = mixtral_ref
    return path, greedy_logits(load_model(path), PROMPT, 8)


@pytest.mark.parametrize("store", ["ram", "mmap"])
@pytest.mark.parametrize("name", ["copy", "cpu", "mix"])
def test_every_miss_policy_equals_resident(resident, store, name):
    path, (want_tokens, want_logits) = resident
    cfg = ModelConfig.from_dir(path)
    for k in (cfg.experts_per_tok, cfg.num_experts - 1):
        model = load_model(path, experts=offloading.make_factory(slots=k, store=store, miss_policy=policy(name)))
        tokens, logits = greedy_logits(model, PROMPT, 8)  # chunked prefill, then decode
        assert tokens == want_tokens and torch.equal(logits, want_logits), (k, store, name)
        s = model.experts.stats()
        assert s["expert_misses"] == s["expert_copies"] + s["cpu_expert_runs"]
        assert s["copies_avoided_bytes"] == s["cpu_expert_runs"] * s["expert_bytes"]
        assert (s["cpu_expert_runs"] > 0) == (name != "copy")
        assert (s["expert_copies"] == 0) == (name == "cpu")


@pytest.mark.parametrize("name", ["cpu", "mix"])
def test_fused_store_misses_on_the_host_equal_resident(fused_store, name):  # noqa: F811
    want = [_logits(load_model(fused_store), p) for p in PROMPTS]
    model = load_model(fused_store, experts=offloading.make_factory(slots=2, store="mmap", miss_policy=policy(name)))
    for p, w in zip(PROMPTS, want, strict=True):
        assert torch.equal(_logits(model, p), w), name
    assert model.experts.stats()["cpu_expert_runs"] > 0


def test_flags_reach_the_engine(mixtral_ref, tmp_path, capsys):
    from mixtral_lite.cli.generate import main

    _, path = mixtral_ref
    base = ["-m", str(path), "-p", "It is a truth", "-n", "6", "--temperature", "0", "--ignore-eos"]
    main(base)
    want = capsys.readouterr().out
    main([*base, "--experts-per-layer", "2", "--miss-policy", "cpu", "--stats-json", str(tmp_path / "s")])
    got = capsys.readouterr()
    assert got.out == want
    stats = json.loads((tmp_path / "s").read_text())
    assert stats["cpu_expert_runs"] == stats["expert_misses"] > 0 and stats["miss_policy"] == "cpu"
    assert "run on the CPU" in got.err
    assert parse("--miss-policy", "auto", "--cpu-threads", "2").cpu_threads == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cpu", "mix", "auto"])
def test_cuda_misses_on_the_host_match_copies(fused_store, name):  # noqa: F811
    def run(miss):
        model = load_model(fused_store, device="cuda", dtype=torch.bfloat16,
                           experts=offloading.make_factory(slots=2, store="mmap", miss_policy=miss))
        return _logits(model, PROMPTS[0]).float().cpu(), model.experts.stats()
    want, _ = run("copy")
    got, s = run(policy(name))
    # the host kernel is torch's CPU int4 kernel: close to the GPU's, not bitwise
    assert ((got - want).norm() / want.norm()).item() < 0.03
    assert s["expert_misses"] == s["expert_copies"] + s["cpu_expert_runs"]
