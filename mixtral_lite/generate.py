"""`python -m mixtral_lite.generate`: stream a continuation of a prompt.

stdout carries only the generated text; stderr carries the figures (load time, time to
first token, decode tokens/s, memory, expert-cache counters); --stats-json writes them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from . import default_model_path
from .config import DTYPES, ModelConfig
from .kv_cache import kv_cache_bytes
from .model import Transformer, load_model
from .runstats import device_bytes, format_stats, peak_rss_bytes, write_json_atomic
from .sampling import check_args, sample
from .tokenizer import StreamingDetokenizer, Tokenizer
from .tracing import trace_model

try:  # the offload engine adds its flags when present
    from . import offloading
except ImportError:
    offloading = None

SHIPPED_EXPERTS_PER_LAYER = 4  # the default demo offloads: 4 of 8 experts per layer on the device


@torch.inference_mode()
def generate_stream(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, window: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    chunk: int = 512) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B] int64), max_new_tokens times.

    Prompts of different lengths are left-padded; padding is masked out, so each row
    gets exactly what it would get alone. The prompt is prefilled in chunks of `chunk`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
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
        nxt = sample(logits[:, -1].float(), temperature, top_k, top_p, gen)
        yield nxt
        if i + 1 < max_new_tokens:  # the last token is never fed back
            logits = model(nxt[:, None], cache)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixtral-lite", description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", type=Path, help="checkpoint folder (default: the shipped Austen model)")
    p.add_argument("-p", "--prompt", help="prompt text")
    p.add_argument("-f", "--file", type=Path, help="read the prompt from this file")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("-s", "--seed", type=int, default=0)
    p.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="KV window when the model has no sliding_window; a window shorter than the "
                        "text is an approximation (Mixtral-8x7B has no sliding window)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("-t", "--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, the checkpoint's on cuda")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Instruct chat format")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")
    p.add_argument("--stats-json", type=Path, help="write the run's figures to this JSON file")
    p.add_argument("--trace-routing", type=Path, metavar="FILE",
                   help="record every (token, layer) expert choice and prefetch guess as jsonl")
    if offloading is not None:
        offloading.add_args(p)
    return p


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available (try --device cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def read_prompt(args) -> str:
    if args.prompt is not None and args.file is not None:
        raise SystemExit("error: give either -p/--prompt or -f/--file, not both")
    if args.file is not None:
        if not args.file.is_file():
            raise SystemExit(f"error: -f/--file: {args.file} does not exist")
        text = args.file.read_text(encoding="utf-8")
    else:
        text = args.prompt or ""
    if not text.strip():
        raise SystemExit("error: the prompt is empty (give -p TEXT or -f FILE)")
    return text


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.model is None:
        args.model = default_model_path()
        if offloading is not None and getattr(args, "experts_per_layer", None) is None:
            args.experts_per_layer = SHIPPED_EXPERTS_PER_LAYER
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: -m/--model: {args.model} is not a model folder (no config.json)")
    if args.max_new_tokens < 0:
        raise SystemExit("error: -n/--max-new-tokens must be >= 0")
    try:
        check_args(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    text = read_prompt(args)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("error: -t/--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else _default_dtype(args.model, device)
    t0 = time.perf_counter()
    factory = offloading.build(args, ModelConfig.from_dir(args.model), device, dtype) if offloading else None
    model = load_model(args.model, device=device, dtype=dtype, experts=factory)
    tok = Tokenizer.from_dir(args.model)
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"error: {args.model}: tokenizer.model has {tok.vocab_size} pieces but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    load_s = time.perf_counter() - t0
    ids = tok.encode_chat([{"role": "user", "content": text}]) if args.chat else tok.encode(text)
    tracer = trace_model(model, args.trace_routing) if args.trace_routing else None
    try:
        stats = run(model, tok, ids, args, device)
    except BrokenPipeError:  # stdout's reader has gone (`| head`): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error flushing at exit
        raise SystemExit(1) from None
    finally:
        if tracer is not None:
            tracer.close()
    stats = {"load_s": load_s, **stats}
    if model.experts is not None:
        stats |= model.experts.stats()
    print(format_stats(stats), file=sys.stderr)
    if args.stats_json:
        write_json_atomic(args.stats_json, stats)


def _default_dtype(model_dir: Path, device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32
    dtype = DTYPES[ModelConfig.from_dir(model_dir).dtype]
    return torch.float16 if dtype == torch.float32 else dtype


def run(model, tok: Tokenizer, ids: list[int], args, device: torch.device) -> dict:
    """Generate, streaming text to stdout; return the figures."""
    window = model.config.sliding_window or args.ctx_size
    dtype = model.embed.weight.dtype
    eos = None if args.ignore_eos else tok.eos_id
    detok = StreamingDetokenizer(tok)
    generated: list[int] = []
    t0 = time.perf_counter()
    t_first = None
    stream = generate_stream(model, [ids], args.max_new_tokens, window=window, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, chunk=args.batch_size)
    for step in stream:
        token = int(step[0])
        if t_first is None:
            t_first = time.perf_counter()
        generated.append(token)
        if token == eos:
            break
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()
    sys.stdout.write(detok.flush() + "\n")
    t_end = time.perf_counter()
    t_first = t_first or t_end
    decode_n = max(len(generated) - 1, 0)
    return {
        "prompt_tokens": len(ids), "generated_tokens": len(generated), "generated_ids": generated,
        "ttft_s": t_first - t0,
        "decode_tokens_per_s": decode_n / (t_end - t_first) if decode_n and t_end > t_first else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_device_bytes": device_bytes(model, kv_cache_bytes(model.config, window, dtype), device),
        "window": window, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
    }


if __name__ == "__main__":
    main()
