"""mixtral_lite computes what transformers computes: logits, decoding, windows, batches."""

from __future__ import annotations

import copy

import pytest
import torch

from mixtral_lite.generation.decode import generate
from mixtral_lite.runtime.load import load_model

REFS = ["mixtral_ref", "mistral_ref"]


def prompt(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (batch, n), generator=g)


@pytest.mark.parametrize("ref", REFS + ["mixtral_window_ref", "mistral_window_ref"])
def test_prefill_logits_equal_transformers(ref, request):
    hf, path = request.getfixturevalue(ref)
    ours = load_model(path)
    x = prompt(30, batch=2)  # 30 tokens > the window of 8 in the *_window_ref models
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("ref", REFS + ["mixtral_window_ref"])
def test_token_by_token_decoding_equals_full_prefill(ref, request):
    hf, path = request.getfixturevalue(ref)
    ours = load_model(path)
    x = prompt(24, seed=1)
    cache = ours.new_cache(1, ours.config.sliding_window or 64)
    with torch.no_grad():
        steps = [ours(x[:, :4], cache)] + [ours(x[:, t : t + 1], cache) for t in range(4, 24)]
        diff = (torch.cat(steps, dim=1) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("ref", ["mixtral_window_ref", "mistral_window_ref"])
@pytest.mark.parametrize("chunk", [3, 8, 13])
def test_chunked_prefill_longer_than_window(ref, chunk, request):
    hf, path = request.getfixturevalue(ref)
    ours = load_model(path)
    x = prompt(29, seed=2)
    cache = ours.new_cache(1, ours.config.sliding_window)
    with torch.no_grad():
        parts = [ours(x[:, s : s + chunk], cache) for s in range(0, 29, chunk)]
        diff = (torch.cat(parts, dim=1) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("ref", ["mixtral_window_ref", "mistral_window_ref"])
def test_chunks_after_decoding_steps_equal_transformers(ref, request):
    """Unpadded decoding skips the slot bookkeeping; a prompt chunk after it must still see every key."""
    hf, path = request.getfixturevalue(ref)
    ours = load_model(path)
    x = prompt(30, seed=3)
    cache = ours.new_cache(1, ours.config.sliding_window)  # window 8: decoding wraps the ring
    with torch.no_grad():
        parts = [ours(x[:, :5], cache)] + [ours(x[:, t : t + 1], cache) for t in range(5, 16)]
        parts += [ours(x[:, 16:21], cache)] + [ours(x[:, t : t + 1], cache) for t in range(21, 27)]
        parts += [ours(x[:, 27:30], cache)]
        diff = (torch.cat(parts, dim=1) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("ref", REFS + ["mixtral_window_ref"])
def test_greedy_64_tokens_identical(ref, request):
    hf, path = request.getfixturevalue(ref)
    ours = load_model(path)
    ids = prompt(11, seed=3)[0].tolist()
    window = ours.config.sliding_window or 128
    assert generate(ours, [ids], 64, window=window)[0] == hf_greedy(hf, ids, 64)


@pytest.mark.parametrize("ref", REFS)
def test_batched_left_padded_equals_one_by_one(ref, request):
    _, path = request.getfixturevalue(ref)
    ours = load_model(path)
    prompts = [prompt(n, seed=n)[0].tolist() for n in (3, 9, 6)]
    batched = generate(ours, prompts, 20, window=64)
    alone = [generate(ours, [p], 20, window=64)[0] for p in prompts]
    assert batched == alone


def test_rolling_cache_memory_is_flat(mixtral_window_ref):
    _, path = mixtral_window_ref
    ours = load_model(path)
    cache = ours.new_cache(1, 8)
    with torch.no_grad():
        ours(prompt(1), cache)
        after_one = cache.nbytes, [t.data_ptr() for t in (cache.k, cache.v)]
        for t in range(80):  # 10x the window
            ours(prompt(1, seed=t), cache)
    assert (cache.nbytes, [t.data_ptr() for t in (cache.k, cache.v)]) == after_one
    c = ours.config
    assert cache.k.numel() + cache.v.numel() == 8 * c.num_layers * c.num_kv_heads * c.head_dim * 2


@pytest.mark.parametrize("ref", REFS)
def test_bfloat16_close_to_transformers(ref, request):
    hf, path = request.getfixturevalue(ref)
    ours = load_model(path, dtype=torch.bfloat16)
    x = prompt(16, seed=5)
    with torch.no_grad():
        want = copy.deepcopy(hf).to(torch.bfloat16)(x).logits.float()  # the session's fp32 model stays intact
        got = ours(x).float()
    # bf16 keeps 8 bits of mantissa: compare at the scale of the logits
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()
