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
from ..runtime.flags import (
    NON_NEGATIVE,
    POSITIVE,
    Parser,
    add_model_args,
    add_sampling_args,
    positive_float,
    resolve_seed,
)
from .front_door import (
    Terminated,
    add_version,
    check_model_dir,
    check_output,
    fail,
    front_door,
    guard_std_streams,
    read_text,
    silence_stdout,
)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="mixtral-lite", description=__doc__.splitlines()[0])
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
    g = p.add_argument_group("--dry-run planning")
    g.add_argument("--bits", type=int, choices=(2, 3, 4, 8),
                   help="plan the store tools/quantize_experts.py --bits N would make from -m (config.json is "
                        "enough; the quantizer's default dense settings)")
    g.add_argument("--group-size", type=POSITIVE, help="with --bits: weights per scale/zero (default: the quantizer's)")
    g.add_argument("--cards", type=card_sizes, nargs="?", const=CARDS, metavar="GB,...",
                   help="also plan each card size, on CUDA (GiB, as --device-memory; default 8,12,16,24)")
    return p


CARDS = (8.0, 12.0, 16.0, 24.0)  # = runtime.dry_run.CARDS, without importing torch


def card_sizes(text: str) -> tuple[float, ...]:
    """argparse type: GiB sizes separated by commas, each a finite number > 0."""
    try:
        return tuple(positive_float(t) for t in text.split(","))
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e} (give GiB sizes like 8,12,16)") from None


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
    check_model_dir(args.model or default_model_path())
    check_output(args.stats_json, "--stats-json")
    check_output(args.trace_routing, "--trace-routing")
    text = None if args.dry_run else read_prompt(args)
    from ..generation.sampling import check_args
    from ..runtime.about import chat_note
    from ..runtime.plan import plan_load

    try:
        check_args(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise fail(str(e)) from None

    check_planning_flags(args)
    plan = plan_load(args, planning=args.dry_run)  # the flags end here: below, the plan and this command's options
    from ..runtime import sizing

    planned = sizing.PlannedStore(args.bits, args.group_size) if args.bits is not None else None
    decided = sizing.decide(plan, planned)  # the dry run's figures and the run's placement: the same call
    if args.dry_run:
        return _dry_run(plan, decided, args)
    from ..runtime.device import set_threads

    threads = set_threads(plan.threads)
    resolve_seed(args, "run")
    from ..runtime.checks import check_kv_memory, open_tokenizer

    cfg = plan.config
    tok = open_tokenizer(plan)  # before the model: a missing or mismatched tokenizer costs no load
    ids = tok.encode_chat([{"role": "user", "content": text}]) if args.chat else tok.encode(text)
    if args.chat and (note := chat_note(plan.model_dir)):
        print(f"note: {note}", file=sys.stderr)
    window = plan_window(args, cfg, len(ids))
    check_kv_memory(plan, window, flags="-c/--ctx-size and -n/--max-new-tokens")
    _generate(args, plan, decided, tok, ids, window, threads)


def _generate(args, plan, decided, tok, ids: list[int], window: int, threads: int) -> None:
    from ..runtime.load import load
    from ..runtime.runstats import format_stats, write_json_atomic
    from ..runtime.tracing import trace_model

    t0 = time.perf_counter()
    print(f"load: {plan.model_dir} ({_folder_mib(plan.model_dir):.0f} MiB on disk) on {plan.device}, "
          f"{str(plan.dtype).removeprefix('torch.')} ...", file=sys.stderr, flush=True)
    model = load(plan, decided)
    load_s = time.perf_counter() - t0
    if model.kernel_notes:  # which kernels the quantized weights run on, chosen once at load
        print("kernels: " + ", ".join(f"{k} {v}" for k, v in model.kernel_notes.items()), file=sys.stderr)
    tracer = trace_model(model, args.trace_routing) if args.trace_routing else None
    try:
        stats = run(model, tok, ids, args, plan.device, window)
    finally:
        if tracer is not None:
            tracer.close()
    stats = {"load_s": load_s, "seed": args.seed, "threads": threads, **stats}
    if model.kernel_notes:
        stats["kernels"] = model.kernel_notes
    if model.experts is not None:
        stats |= model.experts.stats()
    print(format_stats(stats), file=sys.stderr)
    stats["plan"] = model.plan_figures  # what --dry-run prints for the same flags
    if args.stats_json:
        write_json_atomic(args.stats_json, stats)
    if stats["interrupted"]:
        sig = stats["interrupted"]
        raise fail(f"interrupted by {sig} after {stats['generated_tokens']} tokens (figures above are for "
                   "those)", 130 if sig == "SIGINT" else 143)


def _folder_mib(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]  # a GGUF is one file
    return sum(f.stat().st_size for f in files) / (1 << 20)


def plan_window(args, cfg, prompt_tokens: int) -> int:
    """The KV window: the model's sliding window or -c, never more than the text needs; warns when
    the text outgrows a full-attention window or the trained context."""
    from ..runtime.checks import context_warnings

    total = prompt_tokens + args.max_new_tokens
    for line in context_warnings(cfg, args.ctx_size, prompt_tokens, args.max_new_tokens).values():
        print(line, file=sys.stderr)
    return max(1, min(cfg.sliding_window or args.ctx_size, total))


def check_planning_flags(args) -> None:
    """--bits, --group-size and --cards plan; they load nothing, so only --dry-run takes them."""
    given = [f for f, v in (("--bits", args.bits), ("--group-size", args.group_size), ("--cards", args.cards))
             if v is not None]
    if given and not args.dry_run:
        raise fail(f"{given[0]}: only with --dry-run (a store is made by tools/quantize_experts.py)")
    if args.group_size is not None and args.bits is None:
        raise fail("--group-size: only with --bits (a store's own group size is in its manifest)")
    if args.cards is not None:
        if args.device == "cpu":
            raise fail("--cards plans CUDA cards: drop --device cpu")
        if args.experts_per_layer is not None:
            raise fail("--cards chooses the expert slots per card: drop --experts-per-layer")
        args.device = "cuda"


def _dry_run(plan, decided, args) -> None:
    from ..runtime.dry_run import cards, figures, format_cards, format_figures
    from ..runtime.runstats import write_json_atomic

    sz, placement = decided
    out = figures(plan, sz, placement)
    print(format_figures(out))
    if args.cards is not None:
        out["cards"] = cards(plan, sz, args.cards)
        print(format_cards(out["cards"], plan.config.num_experts))
    if args.stats_json:
        write_json_atomic(args.stats_json, out)


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
