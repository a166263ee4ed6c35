"""The static decoding step (model/static_step.py): the same tokens as the eager step, on the CPU where it
runs without a graph, and on CUDA replayed as a CUDA graph (bitwise the eager static step)."""

from __future__ import annotations

import pytest
import torch
from test_table_engine import engine as table_engine
from test_table_engine import store as table_store  # noqa: F401  (fixture)

from mixtral_lite.generation.decode import generate
from mixtral_lite.model.static_step import DecodeGraph, forward_static, static_unsupported
from mixtral_lite.runtime.load import load_model

PROMPTS = [[1, 415, 2936, 9060, 285, 1142, 28705, 28770], [1, 330, 1628, 754]]


@torch.inference_mode()
def static_greedy(model, prompts: list[list[int]], n: int, window: int) -> list[list[int]]:
    """Prefill eagerly, then n - 1 static steps (no graph): greedy ids per row."""
    longest = max(len(p) for p in prompts)
    device = model.embed.weight.device
    cache = model.new_cache(len(prompts), window)
    cache.reset(torch.tensor([longest - len(p) for p in prompts], device=device))
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    nxt = model(tokens, cache, last_only=True)[:, -1].argmax(-1)
    out = [nxt.tolist()]
    for _ in range(n - 1):
        cache.sync_pos()
        nxt = forward_static(model, nxt[:, None], cache).argmax(-1)
        cache.advance_static()
        if model.experts is not None and hasattr(model.experts, "end_step"):
            model.experts.end_step(len(prompts))
            model.experts.poll()
        out.append(nxt.tolist())
    return [list(r) for r in zip(*out, strict=True)]


@pytest.mark.parametrize("window", [64, 6])  # 6: the ring wraps during decoding
def test_static_steps_give_the_eager_tokens_dense(mistral_ref, window):
    _, path = mistral_ref
    model = load_model(path)
    for prompts in ([PROMPTS[0]], PROMPTS):  # one row; two rows, one left-padded
        want = generate(model, prompts, 10, window=window)
        assert static_greedy(model, prompts, 10, window) == want


def test_static_steps_through_the_table_engine_give_the_eager_tokens(table_store):  # noqa: F811
    model = load_model(table_store, dtype=torch.bfloat16, experts=lambda *a: table_engine(table_store, 2))
    assert model.experts.device_routing and static_unsupported(model, model.new_cache(1, 8)) is not None  # CPU
    want = generate(model, [PROMPTS[0]], 8, window=64)
    assert static_greedy(model, [PROMPTS[0]], 8, 64) == want
    s = model.experts.stats()  # every row of both runs (8-token prompts run the kernels too: <= KERNEL_ROWS)
    assert s["expert_hits"] + s["expert_misses"] == 2 * (8 + 7) * model.config.num_layers * 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_equal_the_eager_static_step(mistral_ref):
    _, path = mistral_ref
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    assert static_unsupported(model, model.new_cache(1, 64)) is None
    want = static_greedy(model, [PROMPTS[0]], 12, 64)
    got = generate(model, [PROMPTS[0]], 12, window=64)  # decode_step: one eager step, then graph replays
    assert got == want
    cache = model.new_cache(1, 64)
    cache.reset()
    with torch.inference_mode():
        model(torch.tensor([PROMPTS[0]], device="cuda"), cache, last_only=True)
        graph = DecodeGraph(model, cache)
        tok = torch.tensor([[5]], device="cuda")
        eager = graph(tok).clone()  # the eager warm-up
        cache.truncate(len(PROMPTS[0]))
        first = graph(tok).clone()  # captured, replayed
        cache.truncate(len(PROMPTS[0]))
        again = graph(tok).clone()
    assert graph.replays == 2 and torch.equal(first, eager) and torch.equal(again, eager)
