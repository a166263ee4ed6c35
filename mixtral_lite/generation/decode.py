"""The generation loop: chunked prefill, then one token at a time, sampled from checked logits.

Logits that hold NaN or Inf (weights gone bad, a broken rms_norm_eps) stop generation with an
error naming the step, instead of sampling garbage (greedy would print id 0 over and over).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from offload.hostsync import to_host

from ..model.static_step import decode_step
from ..model.transformer import Transformer
from .sampling import sample


class NonFiniteError(ValueError):
    """The model produced NaN/Inf logits; the message names the step."""


def check_logits(logits: torch.Tensor, step: str) -> None:
    """logits [B, V]: raise NonFiniteError naming `step` unless every value is finite."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise NonFiniteError(f"{step}: the model's logits hold {bad} NaN/Inf values of {logits.numel()}; "
                             "its weights or config (e.g. rms_norm_eps) are broken, or the dtype overflows "
                             "(try --dtype float32)")


@torch.inference_mode()
def generate_stream(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, window: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    chunk: int = 512, vocab_limit: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B] int64, on the host), max_new_tokens times.

    Prompts of different lengths are left-padded; padding is masked out, so each row
    gets exactly what it would get alone. The prompt is prefilled in chunks of `chunk`.
    vocab_limit: ids from there on are never sampled (a model vocabulary padded past its tokenizer's).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if chunk < 1 or window < 1:
        raise ValueError(f"chunk ({chunk}) and window ({window}) must be >= 1")
    device = model.embed.weight.device
    longest = max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    cache = model.new_cache(len(prompts), window)
    cache.reset(pad)
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, longest, chunk):
        logits = model(tokens[:, start : start + chunk], cache, last_only=True)
    for i in range(max_new_tokens):
        nxt, host = _next(logits[:, -1].float(), "prompt evaluation" if i == 0 else f"decode step {i}",
                          vocab_limit, temperature, top_k, top_p, gen)
        yield host
        if i + 1 < max_new_tokens:  # the last token is never fed back
            logits = decode_step(model, cache, nxt[:, None])


def _next(last: torch.Tensor, step: str, vocab_limit: int | None, temperature: float, top_k: int, top_p: float,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """last [B, V] -> (ids [B] on the device, the same ids on the host), with one host sync: rows whose
    logits are not all finite come back as -1, and only then is the check run again to name the fault."""
    finite = torch.isfinite(last).all(dim=-1)  # [B]
    limited = last
    if vocab_limit is not None and vocab_limit < last.shape[-1]:
        limited = last.clone()  # the check below must see the model's logits, not these -inf
        limited[:, vocab_limit:] = -math.inf
    nxt = sample(limited, temperature, top_k, top_p, gen)
    ids = to_host(torch.where(finite, nxt, -1))  # the step's single host sync
    if min(ids) < 0:
        check_logits(last, step)
    return nxt, torch.tensor(ids)


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, window: int,
             eos_id: int | None = None, **sampling) -> list[list[int]]:
    """Generated ids per row; a row ends after its EOS (kept, as transformers does)."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in generate_stream(model, prompts, max_new_tokens, window=window, **sampling):
        for row, tok in enumerate(step.tolist()):
            if not done[row]:
                out[row].append(tok)
                done[row] = tok == eos_id
        if all(done):
            break
    return out
