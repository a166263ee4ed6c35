"""The model checks every front end shares (generate, the chat, the server), made before anything heavy loads.

    open_tokenizer(plan)       tokenizer.model against config.json's vocabulary: more pieces than the model has
                               ids is refused; fewer (a padded vocabulary) is noted, and those ids are never
                               sampled (generate's vocab_limit, Session.vocab_limit)
    context_warnings(...)      a text longer than a full-attention KV window (-c), or than the trained context
    check_kv_memory(...)       a KV cache the machine cannot hold at all is refused, naming the flags that size it
"""

from __future__ import annotations

import sys

import torch

from ..model.config import ModelConfig
from ..model.gguf import is_gguf
from ..model.kv_cache import kv_cache_bytes
from ..model.source import open_tokenizer as read_tokenizer
from ..model.tokenizer import Tokenizer
from .budget import GIB
from .plan import LoadPlan


def open_tokenizer(plan: LoadPlan) -> Tokenizer:
    """The model's tokenizer (tokenizer.model, or a GGUF's vocabulary), checked against its config (one-line
    errors naming the files)."""
    cfg, model_dir = plan.config, plan.model_dir
    tok = read_tokenizer(model_dir)
    if tok.vocab_size > cfg.vocab_size:
        what = ("its vocabulary", "its metadata's") if is_gguf(model_dir) else ("tokenizer.model", "config.json's")
        raise SystemExit(f"error: {model_dir}: {what[0]} has {tok.vocab_size} pieces but {what[1]} "
                         f"vocab_size is {cfg.vocab_size}")
    if tok.vocab_size < cfg.vocab_size:
        print(f"note: the model's vocab_size {cfg.vocab_size} exceeds the tokenizer's {tok.vocab_size} pieces; "
              "ids without a piece are never sampled", file=sys.stderr)
    return tok


def context_warnings(cfg: ModelConfig, ctx_size: int, prompt_tokens: int, new_tokens: int,
                     new_label: str = "generation") -> dict[str, str]:
    """{"window" | "trained": warning} for prompt + new tokens beyond a full-attention KV window (-c) or the
    trained context."""
    total, out = prompt_tokens + new_tokens, {}
    if cfg.sliding_window is None and total > ctx_size:
        out["window"] = (f"warning: prompt ({prompt_tokens}) + {new_label} ({new_tokens}) = {total} tokens exceed "
                         f"the KV window (-c {ctx_size}) of a model without a sliding window: the oldest tokens "
                         "drop out of attention (an approximation; raise -c to stay exact)")
    if total > cfg.max_position_embeddings:
        out["trained"] = (f"warning: {total} tokens pass the model's trained context (max_position_embeddings "
                          f"{cfg.max_position_embeddings}): quality may fall beyond it")
    return out


def memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what) of the memory a run's KV cache lives in: the machine's RAM, or the CUDA device's."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory, "the GPU's memory"
    try:
        import psutil

        return psutil.virtual_memory().total, "this machine's RAM"
    except ImportError:  # psutil is a dependency; without it, no check rather than a wrong one
        return 1 << 62, "memory"


def check_kv_memory(plan: LoadPlan, window: int, rows: int = 1, flags: str = "-c/--ctx-size") -> None:
    """Refuse, before loading, KV caches of `rows` x `window` tokens larger than the device's whole memory."""
    need = rows * kv_cache_bytes(plan.config, window, plan.dtype)
    have, what = memory_bytes(plan.device)
    if need > have:
        caches = f"{rows} KV caches of a {window}-token window need" if rows > 1 else \
            f"the KV cache of a {window}-token window needs"
        raise SystemExit(f"error: {flags}: {caches} {need / GIB:.1f} GiB, more than {what} ({have / GIB:.1f} GiB); "
                         f"lower {flags.replace(' and ', ' or ')}")
