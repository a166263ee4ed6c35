"""Transformer.decode, the lean one-token step generation runs, computes forward's logits bit for bit: dense and
MoE models, resident, offloaded and fused int4 experts, a KV ring that wraps, left-padded batches; generation
and the Session take it for every step after the prompt; and it dispatches fewer aten ops than forward."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import pytest
import torch
from test_fused import fused_store  # noqa: F401  (fixture)

from mixtral_lite import default_model_path
from mixtral_lite.generation.decode import generate, generate_stream
from mixtral_lite.generation.session import Generation, Params, Session
from mixtral_lite.model.tokenizer import Tokenizer
from mixtral_lite.runtime import offloading
from mixtral_lite.runtime.load import load_model

_spec = importlib.util.spec_from_file_location(
    "bench_cpu_step", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

PROMPTS = [[1, 415, 2936, 9060, 285, 1142, 28705, 28770], [1, 330, 1628], [1, 28705, 13, 1014, 349]]


@torch.inference_mode()
def both_paths(model, prompts: list[list[int]], steps: int, window: int) -> list[int]:
    """Prefill two caches alike, then `steps` greedy steps, forward on one and decode on the other: asserts
    every step's logits and the caches' keys and values equal bit for bit; returns the first row's ids."""
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts])
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    caches = [model.new_cache(len(prompts), window), model.new_cache(len(prompts), window)]
    for c in caches:
        c.reset(pad)
        logits = model(tokens, c, last_only=True)
    ids = []
    for step in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids.append(int(nxt[0]))
        logits = model(nxt, caches[0])
        lean = model.decode(nxt, caches[1])
        assert lean.shape == logits.shape and torch.equal(lean, logits), f"step {step}"
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    return ids


@pytest.mark.parametrize("ref", ["mixtral_ref", "mistral_ref", "mixtral_window_ref", "mistral_window_ref"])
@pytest.mark.parametrize("rows", [1, 3])  # 3: left-padded rows at different positions
@pytest.mark.parametrize("window", [64, 6])  # 6: the ring wraps during the prompt and the steps
def test_decode_equals_forward_bitwise(ref, rows, window, request):
    _, path = request.getfixturevalue(ref)
    both_paths(load_model(path), PROMPTS[:rows], 20, window)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ref", ["mixtral_window_ref", "mistral_window_ref"])
def test_decode_equals_forward_bitwise_on_cuda(ref, request):
    """Where no CUDA graph runs (--cuda-graphs off, experts without device routing) generation decodes with
    Transformer.decode on the GPU too."""
    _, path = request.getfixturevalue(ref)
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    both_paths(model, PROMPTS, 16, 6)


def test_decode_equals_forward_in_bfloat16(mixtral_window_ref):
    _, path = mixtral_window_ref
    both_paths(load_model(path, dtype=torch.bfloat16), PROMPTS, 16, 8)


@pytest.mark.parametrize("experts", ["ram", "mmap-no-prefetch", "ram-cpu-misses"])
def test_decode_equals_forward_with_offloaded_experts(mixtral_ref, experts):
    _, path = mixtral_ref
    factory = offloading.make_factory(slots=2, store=experts.split("-")[0], prefetch="no-prefetch" not in experts,
                                      miss_policy="cpu" if "cpu" in experts else None)
    model = load_model(path, experts=factory)
    both_paths(model, PROMPTS[:1], 16, 64)
    both_paths(model, PROMPTS, 12, 6)


@pytest.mark.parametrize("experts", ["all", "2", "2-cpu-misses"])  # every expert cached, or 2 of 4 offloaded
def test_decode_equals_forward_on_the_fused_int4_kernels(fused_store, experts):  # noqa: F811
    factory = None if experts == "all" else offloading.make_factory(
        slots=2, miss_policy="cpu" if "cpu" in experts else None)
    model = load_model(fused_store, experts=factory)
    both_paths(model, PROMPTS[:1], 16, 64)
    both_paths(model, PROMPTS, 12, 6)


@pytest.mark.parametrize("slots", [None, 4])
def test_shipped_model_long_generation_bitwise(slots):
    """The shipped model: 150 greedy steps in a window of 48 (the ring wraps twice), every step bitwise."""
    model = load_model(default_model_path(), experts=offloading.make_factory(slots=slots) if slots else None)
    ids = both_paths(model, PROMPTS[:1], 150, 48)
    assert generate(model, PROMPTS[:1], 150, window=48)[0] == ids


class Calls:
    """Counts the model's forward and decode calls by their number of new tokens."""

    def __init__(self, model, monkeypatch):
        self.forward, self.decode = collections.Counter(), collections.Counter()
        for name, counter in (("forward", self.forward), ("decode", self.decode)):
            inner = getattr(model, name)

            def call(tokens, *args, inner=inner, counter=counter, **kwargs):
                counter[tokens.shape[1]] += 1
                return inner(tokens, *args, **kwargs)

            monkeypatch.setattr(model, name, call)


def test_generation_and_session_decode_every_step_after_the_prompt(mixtral_ref, monkeypatch):
    _, path = mixtral_ref
    model = load_model(path)
    calls = Calls(model, monkeypatch)
    for _ in generate_stream(model, PROMPTS, 9, window=64, chunk=3):  # prompt chunks of 3, 3, 2
        pass
    assert calls.forward == {3: 2, 2: 1} and calls.decode == {1: 8}
    calls.forward.clear()
    calls.decode.clear()
    session = Session(model, Tokenizer(path / "tokenizer.model"), window=64, chunk=4)
    gens = [Generation(list(p), Params(max_tokens=6, ignore_eos=True)) for p in PROMPTS[:2]]
    for _ in session.run(gens):
        pass
    assert calls.forward == {4: 2} and calls.decode == {1: 5}  # 8 padded prompt tokens in 2 chunks, then 5 steps


@torch.inference_mode()
def ops_per_layer(model, step) -> tuple[float, int]:
    """(ops per layer, ops outside the layers) of a step after the first, counted by the benchmark's OpCounter."""
    cache = model.new_cache(1, 64)
    cache.reset()
    logits = model(torch.tensor([PROMPTS[0]]), cache)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    step(nxt, cache)
    counter = bench.OpCounter().in_layers(model)
    try:
        with counter:
            step(nxt, cache)
    finally:
        bench.OpCounter.done(model)
    s = counter.summary(model.config.num_layers)
    return s["ops_per_layer"], s["ops_outside_layers"]


# aten ops per layer of a lean step (benchmarks/bench_cpu_step.py shows them by name), measured with torch 2.13:
# MoE with 2 of 4 experts resident, and dense (forward's one-token step: 56 and 36)
@pytest.mark.parametrize("ref,budget", [("mixtral_ref", 40), ("mistral_ref", 22)])
def test_lean_step_op_budget(ref, budget, request):
    _, path = request.getfixturevalue(ref)
    model = load_model(path)
    (lean, lean_out), (eager, _) = ops_per_layer(model, model.decode), ops_per_layer(model, model.forward)
    assert lean <= budget and lean_out <= 16, (lean, lean_out)
    assert lean <= eager - 10, (lean, eager)
