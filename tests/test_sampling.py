"""Sampling: greedy, top-k, top-p masks, seeding, and empirical frequencies of the draws."""

import math

import pytest
import torch

from mixtral_lite.generation.sampling import filter_logits, sample

# a hand-built distribution with well separated cumulative sums: 0.5, 0.8, 0.95, 1.0
PROBS = [0.5, 0.3, 0.15, 0.05]


def hand_logits(perm=(2, 0, 3, 1)) -> tuple[torch.Tensor, list[int]]:
    """[1,4] log-probs of PROBS, shuffled so sorting matters; rank -> token id."""
    logits = torch.empty(1, 4)
    for rank, tok in enumerate(perm):
        logits[0, tok] = math.log(PROBS[rank])
    return logits, list(perm)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def g(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=g(0))
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert sample(logits, 0.0).dtype == torch.int64


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_top_k_1_is_greedy(temperature):
    logits = torch.randn(8, 50, generator=g(1))
    assert torch.equal(sample(logits, temperature, top_k=1, generator=g(2)), logits.argmax(-1))


@pytest.mark.parametrize(
    "top_p,ranks",
    [(0.3, {0}), (0.49, {0}), (0.51, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (0.96, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, ranks):
    logits, token_of = hand_logits()
    assert kept(filter_logits(logits, top_p=top_p)) == {token_of[r] for r in ranks}


def test_top_k_masks_all_but_k_best():
    logits, token_of = hand_logits()
    assert kept(filter_logits(logits, top_k=2)) == {token_of[0], token_of[1]}
    assert kept(filter_logits(logits, top_k=4)) == kept(filter_logits(logits, top_k=0)) == set(token_of)


def test_top_p_applies_to_the_renormalised_top_k_distribution():
    # after top-k 2 the best token has 0.5 / 0.8 = 0.625 >= 0.6, so only it stays;
    # top-p first on the full distribution (0.5 < 0.6) would have kept two tokens
    logits, token_of = hand_logits()
    assert kept(filter_logits(logits, top_k=2, top_p=0.6)) == {token_of[0]}


def test_top_p_uses_temperature_scaled_logits():
    logits, token_of = hand_logits()
    # at temperature 0.1 the best token holds > 0.99 of the mass: only it is ever drawn with top-p 0.9
    draws = sample(logits.expand(200, 4), 0.1, top_p=0.9, generator=g(3))
    assert set(draws.tolist()) == {token_of[0]}
    # at temperature 1 the same top-p keeps three tokens, and all three are drawn
    draws = sample(logits.expand(2000, 4), 1.0, top_p=0.9, generator=g(3))
    assert set(draws.tolist()) == {token_of[0], token_of[1], token_of[2]}


def test_seeding():
    logits = torch.zeros(64, 1000)  # uniform: every draw is pure generator output
    a, b, c = (sample(logits, 1.0, generator=g(s)) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_empirical_frequencies_match_renormalised_distribution():
    base = torch.tensor([[2.0, 1.5, 1.0, 0.3, -0.5, -1.0, -3.0]])
    temperature, top_k, top_p = 0.8, 5, 0.85
    # the expected distribution, computed independently with plain Python
    w = sorted(((math.exp(x / temperature), i) for i, x in enumerate(base[0].tolist())), reverse=True)[:top_k]
    total = sum(p for p, _ in w)
    nucleus, mass = [], 0.0
    for p, i in w:
        if mass >= top_p:
            break
        nucleus.append((p / total, i))
        mass += p / total
    z = sum(p for p, _ in nucleus)
    expected = {i: p / z for p, i in nucleus}
    assert len(expected) == 3  # the test exercises both cuts (7 -> 5 -> 3)

    n = 40_000
    draws = sample(base.expand(n, -1), temperature, top_k, top_p, generator=g(11))
    counts = torch.bincount(draws, minlength=base.shape[1]).tolist()
    assert all(counts[i] == 0 for i in range(base.shape[1]) if i not in expected)
    chi2 = sum((counts[i] - n * p) ** 2 / (n * p) for i, p in expected.items())
    assert chi2 < 20.0  # 2 degrees of freedom: P(chi2 > 20) ~ 5e-5 for a correct sampler


def test_accepts_low_precision_logits():
    logits = torch.randn(3, 40, generator=g(4)).to(torch.bfloat16)
    out = sample(logits, 0.7, top_k=10, top_p=0.9, generator=g(5))
    assert out.shape == (3,) and out.dtype == torch.int64
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.1), "--temperature"),
        (dict(temperature=float("nan")), "--temperature"),
        (dict(top_k=-1), "--top-k"),
        (dict(top_k=2.5), "--top-k"),
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
    ],
)
def test_bad_arguments_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(torch.zeros(1, 4), **kwargs)


def test_bad_shape():
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample(torch.zeros(4), 1.0)
