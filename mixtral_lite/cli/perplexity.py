"""`python -m mixtral_lite.perplexity -f TEXT`: sliding-window perplexity of a text file.

Hugging Face's strided evaluation: windows of `--ctx` tokens advance by `--stride`, and each
window scores only the tokens no earlier window scored, so every token is scored exactly once
and (for stride < ctx) with at least ctx - stride tokens of context. Every window starts with
BOS, as every sequence the model sees in generation does:

    text ids t0..t9, ctx 5 (BOS + 4 text tokens), stride 2:
      window [BOS t0 t1 t2 t3] scores t0 t1 t2 t3
      window [BOS t2 t3 t4 t5] scores t4 t5
      window [BOS t4 t5 t6 t7] scores t6 t7 ...

Works for full-precision checkpoints and quantized stores alike (`load_model` opens both).
--json prints one JSON object as the last stdout line; the progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .. import default_model_path
from ..runtime.flags import POSITIVE, Parser, add_device_args, add_offload_args
from .front_door import add_version, check_model_dir, fail, front_door, guard_std_streams, read_text

if TYPE_CHECKING:  # torch is imported after the arguments are parsed (fast --help)
    import torch

    from ..model.transformer import Transformer


def windows(n: int, ctx: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_scored) over text ids [0, n): the window holds BOS + ids[begin:end]
    and scores ids[first_scored:end]."""
    if ctx < 2 or not 1 <= stride <= ctx - 1:
        raise ValueError(f"need ctx >= 2 and 1 <= stride <= ctx - 1, got ctx {ctx}, stride {stride}")
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + ctx - 1, n)
        yield begin, end, prev_end
        prev_end = end
        if end == n:
            return


def window_nll(model: Transformer, ids: torch.Tensor, bos: int, begin: int, end: int, first: int) -> torch.Tensor:
    """Sum of -log p(ids[j] | BOS, ids[begin:j]) over j in [first, end), in float64."""
    import torch

    # T = end - begin + 1 (BOS + window), V = vocab; logits[i] predicts ids[begin + i]
    with torch.inference_mode():
        x = torch.cat([ids.new_tensor([bos]), ids[begin:end]])[None]  # [1,T]
        logits = model(x)[0, first - begin : end - begin].double()  # [scored,V]
        target = ids[first:end]
        return (torch.logsumexp(logits, -1) - logits.gather(1, target[:, None]).squeeze(1)).sum()


def perplexity(model: Transformer, ids: list[int], bos: int, ctx: int, stride: int,
               progress: bool = False) -> dict:
    """Sliding-window perplexity of text ids (without BOS); returns nll, tokens, timing."""
    if len(ids) < 1:
        raise ValueError("no tokens to score")
    import torch

    device = model.embed.weight.device
    t = torch.tensor(ids, device=device)
    total, scored, t0 = 0.0, 0, time.perf_counter()
    for begin, end, first in windows(len(ids), ctx, stride):
        nll = float(window_nll(model, t, bos, begin, end, first))
        if not math.isfinite(nll):  # NaN/Inf logits: no perplexity to report, and never NaN in JSON
            raise ValueError(f"text tokens {first}..{end - 1} (window from token {begin}): the model's "
                             f"log-likelihood is {nll}; its weights or config (e.g. rms_norm_eps) are broken")
        total += nll
        scored += end - first
        if progress:
            _bar(scored, len(ids), time.perf_counter() - t0)
    if progress:
        print(file=sys.stderr)
    seconds = time.perf_counter() - t0
    return {"perplexity": math.exp(total / scored), "nll": total / scored, "tokens": scored,
            "seconds": seconds, "tokens_per_s": scored / seconds if seconds > 0 else 0.0}


def _bar(done: int, total: int, seconds: float, width: int = 30) -> None:
    fill = int(width * done / total)
    rate = done / seconds if seconds > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    print(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} tokens {rate:.0f} tok/s ETA {eta:.0f}s",
          end="", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m mixtral_lite.perplexity", description=__doc__.splitlines()[0])
    add_version(p)
    p.add_argument("-m", "--model", type=Path, help="checkpoint folder or quantized store "
                   "(default: the shipped Austen model)")
    p.add_argument("-f", "--file", type=Path, required=True, help="UTF-8 text file to score (- = stdin)")
    p.add_argument("-c", "--ctx", type=POSITIVE, default=512, help="tokens per window, BOS included (>= 2)")
    p.add_argument("--stride", type=POSITIVE, help="window step in tokens (default: ctx // 2)")
    p.add_argument("--max-tokens", type=POSITIVE, help="score only the first N text tokens")
    add_device_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_offload_args(p)  # generate's flags and defaults: Mixtral offloads here as it does there
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with front_door():
        _main(args)


def _main(args) -> None:
    guard_std_streams()
    check_model_dir(args.model or default_model_path())
    stride = args.stride if args.stride is not None else max(1, args.ctx // 2)
    if args.ctx < 2 or not 1 <= stride <= args.ctx - 1:
        raise fail(f"need --ctx >= 2 and 1 <= --stride <= ctx - 1 (got {args.ctx}, {stride})")
    text = read_text(args.file)
    from ..model.source import open_tokenizer
    from ..runtime.load import load
    from ..runtime.plan import plan_load

    args.ctx_size = args.batch_size = args.ctx  # what the plan sizes the KV cache and activations by
    plan = plan_load(args)
    tok = open_tokenizer(plan.model_dir)
    ids = tok.encode(text, bos=False)[: args.max_tokens]
    if not ids:
        raise fail(f"-f/--file: {args.file} has no tokens")
    model = load(plan)
    res = perplexity(model, ids, tok.bos_id, args.ctx, stride, progress=not args.no_progress)
    res |= {"model": str(plan.model_dir), "file": str(args.file), "ctx": args.ctx, "stride": stride,
            "device": str(plan.device), "dtype": str(plan.dtype).removeprefix("torch.")}
    if model.kernel_notes:  # which kernels the quantized weights ran on (a failed self-check falls back)
        res["kernels"] = model.kernel_notes
    if model.experts is not None:
        res |= {k: v for k, v in model.experts.stats().items() if k in ("hit_rate", "bytes_per_token", "stall_s")}
    if args.json:
        print(json.dumps(res, allow_nan=False))
    else:
        print(f"perplexity {res['perplexity']:.3f} over {res['tokens']} tokens "
              f"(ctx {args.ctx}, stride {stride}) at {res['tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    main()
