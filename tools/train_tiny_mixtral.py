"""Train a small Mixtral (8 experts, top-2, GQA, RoPE, RMSNorm) on a plain-text file, on the CPU.

The model, its losses and the Hugging Face export live in tools/tiny_mixtral.py; this script
holds the data pipeline, the training loop and the command line. `--out` writes a checkpoint
that transformers and mixtral_lite load.

    python tools/train_tiny_mixtral.py --train austen-train.txt --valid austen-valid.txt \
        --run-dir /work/train_runs/austen --total-steps 3000 --max-minutes 85 --out DIR
    python tools/train_tiny_mixtral.py --run-dir ... --resume ...   # continue where it stopped
    python tools/train_tiny_mixtral.py --run-dir ... --export-only --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ is a folder of scripts, not a package
from tiny_mixtral import (  # noqa: E402
    TinyConfig,
    TinyMixtral,
    export,
    loss_fn,
    tokenizer_path,
)

# ---------------------------------------------------------------- data


def tokenize_file(path: str, cache_dir: Path | None) -> np.ndarray:
    """Whole file -> int32 token ids (no BOS); cached as .npy in cache_dir."""
    text = Path(path).read_text(encoding="utf-8")
    cache = cache_dir / f"{Path(path).stem}-{len(text)}.npy" if cache_dir else None
    if cache and cache.exists():
        return np.load(cache)
    import sentencepiece as spm

    ids = np.asarray(spm.SentencePieceProcessor(model_file=str(tokenizer_path())).encode(text), np.int32)
    if cache:
        np.save(cache, ids)
    return ids


def epoch_windows(n_tokens: int, seq_len: int, seed: int, epoch: int) -> np.ndarray:
    """Start offsets of non-overlapping windows of seq_len text tokens, shifted and shuffled per epoch."""
    rng = np.random.default_rng([seed, epoch])
    shift = int(rng.integers(0, seq_len))
    starts = np.arange(shift, n_tokens - seq_len - 1, seq_len)
    return rng.permutation(starts)


def make_batch(ids: np.ndarray, starts: np.ndarray, seq_len: int, bos: int = 1) -> torch.Tensor:
    """[B, seq_len+1]: BOS then seq_len text tokens (the model always sees BOS at position 0)."""
    rows = [np.concatenate([[bos], ids[s : s + seq_len]]) for s in starts]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


@torch.no_grad()
def evaluate(model: TinyMixtral, ids: np.ndarray, seq_len: int, batch: int, dtype: torch.dtype) -> float:
    """Mean next-token loss over consecutive windows [BOS + seq_len tokens] covering the file."""
    model.eval()
    starts = np.arange(0, len(ids) - seq_len, seq_len)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        b = make_batch(ids, starts[i : i + batch], seq_len)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            ce, _ = loss_fn(model, b)
        total += ce.item() * b[:, 1:].numel()
        count += b[:, 1:].numel()
    model.train()
    return total / count


# ---------------------------------------------------------------- checkpoints and export


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- training


def lr_at(step: int, args, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_frac at --total-steps, or earlier at
    time_frac = 1 (fraction of --max-minutes spent) when --time-schedule is given."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.total_steps - args.warmup))
    if args.time_schedule:
        frac = min(1.0, max(frac, time_frac))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def build(args) -> tuple[TinyMixtral, torch.optim.Optimizer]:
    torch.manual_seed(args.seed)
    cfg = TinyConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, vocab_size=args.vocab,
        router_aux_loss_coef=args.aux_coef, dropout=args.dropout, rope_theta=args.rope_theta,
    )
    model = TinyMixtral(cfg)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def save_state(path: Path, model, opt, pos: dict, args) -> None:
    atomic_torch_save({
        "model": model.state_dict(), "optim": opt.state_dict(), "pos": pos, "args": vars(args),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }, path)


def train(args) -> TinyMixtral:
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ids = tokenize_file(args.train, run)
    valid = tokenize_file(args.valid, run) if args.valid else None
    model, opt = build(args)
    pos = {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "best_valid": float("inf"), "seconds": 0.0}
    state_path = run / "state.pt"
    if args.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        pos = st["pos"]
        torch.set_rng_state(st["rng"]["torch"])
        random.setstate(st["rng"]["python"])
        log(f"resumed at step {pos['step']} (epoch {pos['epoch']}, {pos['tokens']} tokens)")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    metrics = open(run / "metrics.jsonl", "a") if not args.no_metrics else None
    t_start, t_last_save = time.time(), time.time()
    deadline = t_start + args.max_minutes * 60 - pos["seconds"] if args.max_minutes else float("inf")
    if args.deadline:  # absolute wall clock, HH:MM UTC today
        hh, mm = map(int, args.deadline.split(":"))
        now = time.gmtime()
        deadline = min(deadline, t_start + ((hh - now.tm_hour) * 60 + mm - now.tm_min) * 60 - now.tm_sec)
    tok_s, steps_here = 0.0, 0
    stop = min(args.total_steps, pos["step"] + args.stop_after) if args.stop_after else args.total_steps
    while pos["step"] < stop and time.time() < deadline:
        windows = epoch_windows(len(ids), args.seq_len, args.seed, pos["epoch"])
        if pos["index"] + args.batch > len(windows):
            pos["epoch"], pos["index"] = pos["epoch"] + 1, 0
            continue
        batch = make_batch(ids, windows[pos["index"] : pos["index"] + args.batch], args.seq_len)
        budget = args.max_minutes * 60 if args.max_minutes else float("inf")
        lr = lr_at(pos["step"], args, (pos["seconds"] + time.time() - t_start) / budget)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        with torch.autocast("cpu", dtype=dtype, enabled=args.bf16):
            ce, aux = loss_fn(model, batch)
        (ce + model.cfg.router_aux_loss_coef * aux).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        pos["step"] += 1
        pos["index"] += args.batch
        pos["tokens"] += batch[:, 1:].numel()
        steps_here += 1
        tok_s = batch[:, 1:].numel() / dt if steps_here == 1 else 0.9 * tok_s + 0.1 * batch[:, 1:].numel() / dt
        rec = {"step": pos["step"], "tokens": pos["tokens"], "epoch": pos["epoch"], "lr": lr,
               "train_loss": ce.item(), "aux_loss": aux.item(), "grad_norm": float(gnorm), "tok_s": tok_s}
        last = pos["step"] >= stop or time.time() >= deadline
        if valid is not None and (pos["step"] % args.eval_every == 0 or last):
            rec["valid_loss"] = evaluate(model, valid, args.seq_len, args.batch, dtype)
            if rec["valid_loss"] < pos["best_valid"]:
                pos["best_valid"] = rec["valid_loss"]
                atomic_torch_save({"model": model.state_dict(), "pos": dict(pos), "args": vars(args)},
                                  run / "best.pt")
        if metrics:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
        if pos["step"] % args.log_every == 0 or "valid_loss" in rec or last:
            eta = (stop - pos["step"]) * batch[:, 1:].numel() / max(tok_s, 1e-9)
            eta = min(eta, deadline - time.time())
            v = f" valid {rec['valid_loss']:.4f} (ppl {math.exp(rec['valid_loss']):.1f})" if "valid_loss" in rec else ""
            log(f"step {pos['step']}/{args.total_steps} ep {pos['epoch']} tok {pos['tokens']} "
                f"loss {rec['train_loss']:.4f} aux {rec['aux_loss']:.3f} lr {lr:.2e} "
                f"{tok_s:.0f} tok/s ETA {eta / 60:.1f} min{v}")
        if time.time() - t_last_save > args.save_minutes * 60 or last:
            save_state(state_path, model, opt, {**pos, "seconds": pos["seconds"] + time.time() - t_start}, args)
            t_last_save = time.time()
    if steps_here == 0 and not state_path.exists():
        save_state(state_path, model, opt, pos, args)
    return model


def plot(metrics_path: Path, png: Path) -> None:
    """Train (smoothed) and validation loss against tokens seen, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tok = np.array([r["tokens"] for r in recs]) / 1e6
    train = np.array([r["train_loss"] for r in recs])
    k = 25  # moving average over 25 steps: single batches of 2k tokens are noisy
    smooth = np.convolve(train, np.ones(k) / k, mode="valid")
    val = [(r["tokens"] / 1e6, r["valid_loss"]) for r in recs if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(tok, train, color="tab:blue", alpha=0.2, lw=0.6)
    ax.plot(tok[k - 1 :], smooth, color="tab:blue", label=f"train (moving avg of {k} steps)")
    ax.plot(*zip(*val, strict=True), "o-", color="tab:red", label="validation (austen-valid.txt)")
    ax.set(xlabel="training tokens (millions)", ylabel="cross-entropy (nats/token)", ylim=(2.5, 8))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"tiny Mixtral: best validation loss {min(v for _, v in val):.3f} "
                 f"(ppl {math.exp(min(v for _, v in val)):.1f})")
    fig.tight_layout()
    fig.savefig(png.with_name(png.name + ".tmp.png"))
    os.replace(png.with_name(png.name + ".tmp.png"), png)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ", time.gmtime()) + msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", help="plain-text training file")
    ap.add_argument("--valid", help="plain-text validation file (never trained on)")
    ap.add_argument("--run-dir", required=True, help="state.pt, best.pt, metrics.jsonl, token caches")
    ap.add_argument("--out", help="write the final (or --export-only) model here in HF layout")
    ap.add_argument("--resume", action="store_true", help="continue from run-dir/state.pt")
    ap.add_argument("--export-only", action="store_true", help="export run-dir's state (see --export-best)")
    ap.add_argument("--export-best", action="store_true", help="export best.pt (lowest valid loss)")
    ap.add_argument("--plot", metavar="PNG", help="only draw run-dir/metrics.jsonl as loss curves (matplotlib)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000, help="must match the tokenizer (32000)")
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--total-steps", type=int, default=1000, help="length of the LR schedule")
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="training-time budget summed over resumes (0 = none); ends with a final save")
    ap.add_argument("--deadline", help="also stop at this UTC wall-clock time, HH:MM (same day)")
    ap.add_argument("--time-schedule", action="store_true",
                    help="decay the LR by the fraction of --max-minutes spent when ahead of the step count")
    ap.add_argument("--stop-after", type=int, default=0, help="end this invocation after N steps (0 = no)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-minutes", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on AMX/AVX512-BF16 CPUs)")
    ap.add_argument("--no-metrics", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.plot:
        plot(Path(args.run_dir) / "metrics.jsonl", Path(args.plot))
        return
    if args.export_only:
        if not args.out:
            sys.exit("--export-only needs --out")
        src = Path(args.run_dir) / ("best.pt" if args.export_best else "state.pt")
        if not src.exists():
            sys.exit(f"no checkpoint at {src}")
        st = torch.load(src, weights_only=False)
        model, _ = build(argparse.Namespace(**st["args"]))
        model.load_state_dict(st["model"])
        export(model, Path(args.out))
        log(f"exported {src} (step {st['pos']['step']}) to {args.out}")
        return
    if not args.train:
        sys.exit("--train is required for training")
    model = train(args)
    if args.out:
        export(model, Path(args.out))
        log(f"exported to {args.out}")


if __name__ == "__main__":
    main()
