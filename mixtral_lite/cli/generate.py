"""`python -m mixtral_lite.generate`: stream a continuation of a prompt.

stdout carries only the generated text; stderr carries the figures (load time, prompt
evaluation and decode speed, memory, expert-cache counters); --stats-json writes them.
Arguments are parsed before torch is imported, so --help and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path

from .. import default_model_path
from .front_door import (
    NON_NEGATIVE,
    Terminated,
    add_model_args,
    add_sampling_args,
    add_version,
    check_model_dir,
    check_output,
    fail,
    front_door,
    guard_std_streams,
    read_text,
    resolve_seed,
    silence_stdout,
)

# On CUDA the shipped demo offloads 4 of its 8 experts per layer, to show the cache at work; on the
# CPU the "device" is the same RAM, so offloading there would only cost time and stays off by default.
SHIPPED_EXPERTS_PER_LAYER = 4


def __getattr__(name: str):
    """generate() and generate_stream() live in generation.py (this module imports no torch)."""
    if name in ("generate", "generate_stream", "NonFiniteError"):
        from ..generation import decode as generation

        return getattr(generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixtral-lite", description=__doc__.splitlines()[0])
    add_version(p)
    p.add_argument("-p", "--prompt", help="prompt text")
    p.add_argument("-f", "--file", type=Path, help="read the prompt from this UTF-8 file (- = stdin)")
    p.add_argument("-n", "--max-new-tokens", type=NON_NEGATIVE, default=128)
    add_model_args(p)  # -m -c -b -t --device --dtype and the offload flags, shared with server and chat
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Instruct chat format")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")
    p.add_argument("--stats-json", type=Path, help="write the run's figures to this JSON file")
    p.add_argument("--trace-routing", type=Path, metavar="FILE",
                   help="record every (token, layer) expert choice and prefetch guess as jsonl")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan (dense, KV cache, expert slots, host RAM) without loading weights")
    return p


def read_prompt(args) -> str:
    if args.prompt is not None and args.file is not None:
        raise fail("give either -p/--prompt or -f/--file, not both")
    text = read_text(args.file) if args.file is not None else args.prompt or ""
    if not text.strip():
        raise fail("the prompt is empty (give -p TEXT or -f FILE)")
    return text


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with front_door():
        import torch

        threads = torch.get_num_threads()
        try:
            _main(args)
        finally:  # callers in the same process (tests, notebooks) keep their setting
            torch.set_num_threads(threads)


def _main(args) -> None:
    guard_std_streams()
    model_dir = args.model or default_model_path()
    check_model_dir(model_dir)
    check_output(args.stats_json, "--stats-json")
    check_output(args.trace_routing, "--trace-routing")
    text = None if args.dry_run else read_prompt(args)
    from ..generation.sampling import check_args
    from ..model.config import ModelConfig

    try:
        check_args(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise fail(str(e)) from None

    cfg = ModelConfig.from_dir(model_dir)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, cfg, device)
    if args.model is None and device.type == "cuda":
        _shipped_defaults(args)
    if args.dry_run:
        return _dry_run(args, cfg, model_dir, device, dtype)
    set_threads(args)
    resolve_seed(args, "run")
    from ..model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)  # before the model: a missing tokenizer costs no load
    if tok.vocab_size > cfg.vocab_size:
        raise fail(f"{model_dir}: tokenizer.model has {tok.vocab_size} pieces but config.json's vocab_size "
                   f"is {cfg.vocab_size}")
    if tok.vocab_size < cfg.vocab_size:
        print(f"note: the model's vocab_size {cfg.vocab_size} exceeds the tokenizer's {tok.vocab_size} pieces; "
              "ids without a piece are never sampled", file=sys.stderr)
    ids = tok.encode_chat([{"role": "user", "content": text}]) if args.chat else tok.encode(text)
    window = plan_window(args, cfg, len(ids))
    _generate(args, cfg, model_dir, tok, ids, window, device, dtype)


def _generate(args, cfg, model_dir: Path, tok, ids: list[int], window: int, device, dtype) -> None:
    from ..model.transformer import load_model
    from ..runtime.offloading import build
    from ..runtime.runstats import format_stats, write_json_atomic
    from ..runtime.tracing import trace_model

    t0 = time.perf_counter()
    factory = build(args, cfg, device, dtype)
    print(f"load: {model_dir} ({_folder_mib(model_dir):.0f} MiB on disk) on {device}, "
          f"{str(dtype).removeprefix('torch.')} ...", file=sys.stderr, flush=True)
    model = load_model(model_dir, device=device, dtype=dtype, experts=factory)
    load_s = time.perf_counter() - t0
    if model.kernel_notes:  # which kernels the quantized weights run on, chosen once at load
        print("kernels: " + ", ".join(f"{k} {v}" for k, v in model.kernel_notes.items()), file=sys.stderr)
    tracer = trace_model(model, args.trace_routing) if args.trace_routing else None
    try:
        stats = run(model, tok, ids, args, device, window)
    finally:
        if tracer is not None:
            tracer.close()
    stats = {"load_s": load_s, "seed": args.seed, "threads": args.threads, **stats}
    if model.kernel_notes:
        stats["kernels"] = model.kernel_notes
    if model.experts is not None:
        stats |= model.experts.stats()
    print(format_stats(stats), file=sys.stderr)
    if args.stats_json:
        write_json_atomic(args.stats_json, stats)
    if stats["interrupted"]:
        sig = stats["interrupted"]
        raise fail(f"interrupted by {sig} after {stats['generated_tokens']} tokens (figures above are for "
                   "those)", 130 if sig == "SIGINT" else 143)


def _folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / (1 << 20)


def pick_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda: no CUDA device is available (try --device cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str | None, cfg, device):
    import torch

    from ..model.config import DTYPES

    if name:
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    dtype = DTYPES[cfg.dtype]
    return torch.float16 if dtype == torch.float32 else dtype


def _shipped_defaults(args) -> None:
    """The shipped model on CUDA offloads by default unless the user chose the expert layout."""
    if args.experts_per_layer is None and args.device_memory is None:
        args.experts_per_layer = SHIPPED_EXPERTS_PER_LAYER


def set_threads(args) -> None:
    import torch

    from ..runtime.threads import default_threads

    if args.threads is None:
        args.threads, why = default_threads()
        print(f"threads: {args.threads} ({why}; -t N to choose)", file=sys.stderr)
    torch.set_num_threads(args.threads)


def plan_window(args, cfg, prompt_tokens: int) -> int:
    """The KV window: the model's sliding window or -c, never more than the text needs; warns when
    the text outgrows a full-attention window or the trained context."""
    total = prompt_tokens + args.max_new_tokens
    if cfg.sliding_window is None and total > args.ctx_size:
        print(f"warning: prompt ({prompt_tokens}) + generation ({args.max_new_tokens}) = {total} tokens exceed "
              f"the KV window (-c {args.ctx_size}) of a model without a sliding window: the oldest tokens drop "
              "out of attention (an approximation; raise -c to stay exact)", file=sys.stderr)
    if total > cfg.max_position_embeddings:
        print(f"warning: {total} tokens pass the model's trained context (max_position_embeddings "
              f"{cfg.max_position_embeddings}): quality may fall beyond it", file=sys.stderr)
    return max(1, min(cfg.sliding_window or args.ctx_size, total))


def _dry_run(args, cfg, model_dir: Path, device, dtype) -> None:
    from ..runtime.dry_run import format_plan, make_plan
    from ..runtime.runstats import write_json_atomic

    plan = make_plan(args, cfg, model_dir, device, dtype, cfg.sliding_window or args.ctx_size)
    print(format_plan(plan))
    if args.stats_json:
        write_json_atomic(args.stats_json, plan)


def run(model, tok, ids: list[int], args, device, window: int) -> dict:
    """Generate, streaming text to stdout; return the figures (also after SIGINT/SIGTERM)."""
    from ..generation.decode import generate_stream
    from ..model.kv_cache import kv_cache_bytes
    from ..model.tokenizer import StreamingDetokenizer
    from ..runtime.runstats import cuda_memory, device_bytes, disk_read_bytes, peak_rss_bytes

    dtype = model.embed.weight.dtype
    eos = None if args.ignore_eos else tok.eos_id
    detok = StreamingDetokenizer(tok)
    generated: list[int] = []
    disk0 = disk_read_bytes()
    t0 = time.perf_counter()
    t_first, interrupted = None, None
    stream = generate_stream(model, [ids], args.max_new_tokens, window=window, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, chunk=args.batch_size,
                             vocab_limit=tok.vocab_size)
    try:
        for step in stream:
            token = int(step[0])
            t_first = t_first or time.perf_counter()
            generated.append(token)
            if token == eos:
                break
            _write(detok.push(token))
        _write(detok.flush() + "\n")
    except KeyboardInterrupt:
        interrupted = "SIGINT"
    except Terminated:
        interrupted = "SIGTERM"
    if interrupted:
        _write(detok.flush() + "\n")
    t_end = time.perf_counter()
    disk1 = disk_read_bytes()
    t_first = t_first or t_end
    decode_n = max(len(generated) - 1, 0)
    return {
        "prompt_tokens": len(ids), "generated_tokens": len(generated), "generated_ids": generated,
        "ttft_s": t_first - t0,
        "prompt_tokens_per_s": len(ids) / (t_first - t0) if t_first > t0 else 0.0,
        "decode_tokens_per_s": decode_n / (t_end - t_first) if decode_n and t_end > t_first else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
        "disk_read_bytes": None if disk0 is None or disk1 is None else disk1 - disk0,
        "peak_device_bytes": device_bytes(model, kv_cache_bytes(model.config, window, dtype), device),
        **cuda_memory(device),
        "window": window, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "interrupted": interrupted,
    }


def _write(text: str) -> None:
    """Text to stdout; a full or failing stdout is one line naming it (a closed pipe stays quiet)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        silence_stdout()
        if e.errno == errno.EPIPE:
            raise BrokenPipeError() from None
        raise fail(f"writing the text to stdout: {e.strerror}") from None


if __name__ == "__main__":
    main()
