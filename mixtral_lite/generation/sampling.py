"""Next-token sampling as pure functions of logits: greedy, temperature, top-k, top-p (nucleus), seeded.

Order as in transformers' generation: logits / temperature -> top-k -> top-p on the renormalised
top-k distribution -> one draw per row (an exponential race, the Gumbel-max trick: no host sync,
unlike torch.multinomial). B = batch rows, V = vocabulary.
"""

from __future__ import annotations

import math

import torch


def check_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError naming the command-line flag of a bad sampling setting."""
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"--top-k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1] (1 = off), got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits[B,V] with every token outside top-k, then outside the top-p nucleus, set to -inf."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B,1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B,V]
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly better tokens
        # keep the smallest prefix reaching top_p: drop a token once the better ones already reach it;
        # the best token has mass_before == 0 < top_p, so at least one token always stays
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits[B,V] -> [B] int64. temperature 0 (or top_k 1) = greedy argmax.

    `generator` must live on logits' device; seeding it makes the draws reproducible.
    """
    check_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"sample expects logits of shape [batch, vocab], got {tuple(logits.shape)}")
    if temperature == 0 or top_k == 1:
        return torch.max(logits, dim=-1).indices  # = argmax (first of ties), 3x faster on the CPU
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)  # [B,V]
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of probs [B, V], distributed as probs: argmax(p / q) with q ~ Exp(1) (the
    exponential form of the Gumbel-max trick). Unlike torch.multinomial it never checks the
    distribution on the host, so on CUDA a draw costs no synchronisation."""
    q = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / q.clamp_(min=torch.finfo(q.dtype).tiny)).argmax(dim=-1)  # q = 0 would turn p = 0 into NaN
