"""Quality and size of quantized stores, like the Mixtral-offloading paper's Table 1.

    python benchmarks/quant_quality.py [-m MODEL] [--text austen-valid.txt] [--quick] [--json]

For each setting (experts 16/8/4/3/2-bit, hqq or round-to-nearest, x dense weights kept 16-bit or
quantized as tools/quantize_experts.py does by default: attention int4 g64, lm_head and embeddings
int8) the model is quantized into a scratch folder, loaded through the quantized store (experts in
the offload engine, all resident, on the fused kernels where they apply), and measured:

- bits/weight of the experts INCLUDING metadata (every byte of the packed buffer), and the
  bytes of one packed expert at this model's size and, computed from the same layout code,
  at Mixtral-8x7B's (w1, w3 [14336, 4096], w2 [4096, 14336]);
- perplexity on held-out text with mixtral_lite.cli.perplexity (windows of --ctx tokens with BOS,
  advancing by --stride, every token scored once);
- relative logit error vs the unquantized model: ||L_q - L||_F / ||L||_F, averaged over the
  first --err-windows disjoint windows;
- the fused kernels against the dequantize-then-multiply path on the same store: their relative
  logit error, and the share of --agree-tokens greedy tokens after each of --agree-prompts prompts
  (cut from the text) on which the two paths agree, position by position.

Writes benchmarks/results/quant_quality.json (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixtral_lite import default_model_path
from mixtral_lite.cli.perplexity import perplexity
from mixtral_lite.generation.decode import generate
from mixtral_lite.model.config import ModelConfig
from mixtral_lite.model.qstore import DenseSettings, expert_matrices
from mixtral_lite.model.tokenizer import Tokenizer
from mixtral_lite.runtime.load import load_model
from mixtral_lite.runtime.runstats import write_json_atomic
from offload.quant import QuantSpec, bits_per_weight, expert_layout

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TEXT = ROOT.parent / "shared" / "data" / "corpus" / "austen-valid.txt"
MIXTRAL = {"w1": (14336, 4096), "w2": (4096, 14336), "w3": (14336, 4096)}
_spec = importlib.util.spec_from_file_location("quantize_experts", ROOT / "tools" / "quantize_experts.py")
qe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qe)

# (label, expert spec or None = source weights, method); the 2- and 3-bit rows meet the <= 3.0 / <= 3.5 budgets
EXPERTS = [
    ("16-bit", None, None),
    ("8-bit g128", QuantSpec(8, 128, 1, 16), "hqq"),
    ("4-bit g64", QuantSpec(4, 64, 1, 8), "hqq"),
    ("4-bit g64 hqq-fast", QuantSpec(4, 64, 1, 8), "hqq-fast"),
    ("4-bit g64 rtn", QuantSpec(4, 64, 1, 8), "rtn"),
    ("3-bit g128", QuantSpec(3, 128, 1, 8), "hqq"),
    ("3-bit g64", QuantSpec(3, 64, 1, 8), "hqq"),
    ("2-bit g32", QuantSpec(2, 32, 1, 8), "hqq"),
    ("2-bit g32 hqq-fast", QuantSpec(2, 32, 1, 8), "hqq-fast"),
    ("2-bit g32 rtn", QuantSpec(2, 32, 1, 8), "rtn"),
]
DENSE = [("16-bit", DenseSettings()),
         ("int4 attn, int8 head/embed", DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8))]
# with the 4-bit experts only: what each dense choice costs on its own
DENSE_4BIT = [("int4 attn, 16-bit head/embed", DenseSettings(QuantSpec(4, 64, 1, 16), False, 16, 16)),
              ("int8 attn, int8 head/embed", DenseSettings(None, True, 8, 8))]
QUICK_EXPERTS = ("16-bit", "4-bit g64", "3-bit g128", "2-bit g32")
AGREE_PROMPT = 64  # prompt tokens of each greedy-agreement prompt


def eval_ids(model_dir: Path, text: Path, max_tokens: int | None) -> tuple[list[int], int]:
    """The text's token ids (no BOS), cut to max_tokens, and the BOS id."""
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode(text.read_text(encoding="utf-8"), bos=False)
    return (ids[:max_tokens] if max_tokens else ids), tok.bos_id


def err_windows(ids: list[int], bos: int, ctx: int, n: int) -> list[torch.Tensor]:
    """The first n disjoint windows [1, ctx] (BOS + ctx - 1 text tokens) for the logit error."""
    step = ctx - 1
    return [torch.tensor([[bos] + ids[i * step : (i + 1) * step]]) for i in range(min(n, len(ids) // step))]


@torch.inference_mode()
def evaluate(model, ids: list[int], bos: int, args, ref: list[torch.Tensor]) -> tuple[float, float]:
    """(sliding-window perplexity, mean relative logit error vs ref over the error windows)."""
    ppl = perplexity(model, ids, bos, args.ctx, args.stride or args.ctx // 2)["perplexity"]
    errs = []
    for x, r in zip(err_windows(ids, bos, args.ctx, len(ref)), ref, strict=True):
        errs.append(((model(x)[0].float() - r).norm() / r.norm()).item())
    return ppl, sum(errs) / len(errs)


def sizes(cfg: ModelConfig, spec: QuantSpec | None) -> dict:
    mats = expert_matrices(cfg)
    n_model, n_mixtral = sum(a * b for a, b in mats.values()), sum(a * b for a, b in MIXTRAL.values())
    if spec is None:  # the source weights, 16-bit (bf16) as shipped for Mixtral
        return {"bits_per_weight": 16.0, "expert_bytes": 2 * n_model, "expert_bytes_mixtral": 2 * n_mixtral}
    return {"bits_per_weight": bits_per_weight(expert_layout(mats, spec), mats),
            "expert_bytes": expert_layout(mats, spec).nbytes,
            "expert_bytes_mixtral": expert_layout(MIXTRAL, spec).nbytes,
            "bits_per_weight_mixtral": bits_per_weight(expert_layout(MIXTRAL, spec), MIXTRAL)}


@torch.inference_mode()
def agreement(fused, ref, ids: list[int], bos: int, args) -> dict:
    """The fused kernels against the dequantize-then-multiply path on the same store: the share of greedy
    tokens they share generating freely from --agree-prompts prompts (one flip changes every later token),
    the share of positions whose argmax agrees given the same text (teacher-forced, over the error windows),
    and their relative logit error."""
    step = len(ids) // max(args.agree_prompts, 1)
    prompts = [[bos] + ids[i * step : i * step + AGREE_PROMPT] for i in range(args.agree_prompts)]
    a = generate(fused, prompts, args.agree_tokens, window=AGREE_PROMPT + args.agree_tokens + 1)
    b = generate(ref, prompts, args.agree_tokens, window=AGREE_PROMPT + args.agree_tokens + 1)
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    hits, n, errs = 0, 0, []
    for x in err_windows(ids, bos, args.ctx, args.err_windows):
        lf, lr = fused(x)[0].float(), ref(x)[0].float()
        hits += int((lf.argmax(-1) == lr.argmax(-1)).sum())
        n += lf.shape[0]
        errs.append(((lf - lr).norm() / lr.norm()).item())
    return {"fused_token_agreement": same / sum(len(r) for r in a), "fused_argmax_agreement": hits / n,
            "fused_vs_dequant_logit_error": sum(errs) / len(errs)}


def run_setting(src: Path, work: Path, e_label: str, e_spec, method, d_label: str, dense, ids, bos, ref,
                args) -> dict:
    cfg = ModelConfig.from_dir(src)
    row = {"experts": e_label, "dense": d_label, "method": method, "expert_spec": e_spec and e_spec.to_dict(),
           "dense_settings": dense.to_dict(), **sizes(cfg, e_spec)}
    t0 = time.perf_counter()
    if e_spec is None:  # source weights (a store always quantizes the experts)
        model = load_model(src, device=args.device, dtype=torch.float32)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small matrices: hqq's many tiny ops run faster on one thread
        try:
            dst = qe.convert(src, work / f"{e_label}-{d_label}".replace(" ", "_").replace("/", "_"), e_spec, dense,
                             device=args.device, progress=False, method=method)
        finally:
            torch.set_num_threads(threads)
        row["quantize_s"] = time.perf_counter() - t0
        model = load_model(dst, device=args.device, dtype=torch.float32)  # experts via the offload engine
        row["kernels"] = model.kernel_notes
        if args.agree_prompts:
            deq = load_model(dst, device=args.device, dtype=torch.float32, fused=False)
            row |= agreement(model, deq, ids, bos, args)
    row["perplexity"], row["rel_logit_error"] = evaluate(model, ids, bos, args, ref)
    row["seconds"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    base = next(r["perplexity"] for r in rows if r["experts"] == "16-bit" and r["dense"] == "16-bit")
    out = ["| experts | dense | bits/weight (experts, incl. metadata) | bytes/expert (Mixtral-8x7B) | perplexity "
           "| vs 16-bit | rel. logit error | fused = dequant: free-running tokens / argmax, same text "
           "| fused vs dequant logit error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mix = f"{r['expert_bytes_mixtral'] / 2**20:.1f} MiB ({r.get('bits_per_weight_mixtral', 16.0):.3f} b/w)"
        agree = r.get("fused_token_agreement")
        agree = "-" if agree is None else f"{100 * agree:.1f}% / {100 * r['fused_argmax_agreement']:.1f}%"
        ferr = r.get("fused_vs_dequant_logit_error")
        ferr = "-" if ferr is None else f"{ferr:.4f}"
        out.append(f"| {r['experts']} | {r['dense']} | {r['bits_per_weight']:.3f} | {mix} | {r['perplexity']:.3f} "
                   f"| {100 * (r['perplexity'] / base - 1):+.2f}% | {r['rel_logit_error']:.4f} | {agree} | {ferr} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", type=Path, default=default_model_path(), help="HF Mixtral checkpoint")
    p.add_argument("--text", type=Path, default=TEXT, help="held-out text (default: austen-valid.txt)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per window, BOS included")
    p.add_argument("--stride", type=int, help="window step (default ctx // 2; ctx - 1 = disjoint windows)")
    p.add_argument("--max-tokens", type=int, help="score only the first N text tokens")
    p.add_argument("--err-windows", type=int, default=4, help="windows of ctx tokens for the logit error")
    p.add_argument("--only", nargs="+", metavar="LABEL", help="expert settings to run (labels as in the table; "
                   "16-bit is always run: it is the baseline)")
    p.add_argument("--agree-prompts", type=int, default=8, help="prompts for the fused-vs-dequant greedy check")
    p.add_argument("--agree-tokens", type=int, default=32, help="greedy tokens per agreement prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dense", nargs="+", choices=[d[0] for d in DENSE], help="dense settings to run (default: all)")
    p.add_argument("--quick", action="store_true", help="4 expert settings, 512 tokens, ctx 128")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/quant_quality[-quick].json)")
    p.add_argument("--json", action="store_true", help="also print the JSON as the last stdout line")
    args = p.parse_args(argv)
    if args.quick:
        args.ctx, args.max_tokens, args.err_windows, args.agree_prompts, args.agree_tokens = 128, 512, 2, 2, 8
    keep = set(QUICK_EXPERTS if args.quick else args.only or [e[0] for e in EXPERTS]) | {"16-bit"}
    unknown = keep - {e[0] for e in EXPERTS}
    if unknown:
        print(f"error: --only: unknown settings {sorted(unknown)}; choose from {[e[0] for e in EXPERTS]}",
              file=sys.stderr)
        return 2
    experts = [e for e in EXPERTS if e[0] in keep]
    if not (args.model / "config.json").is_file():
        print(f"error: -m/--model: {args.model} is not a model folder", file=sys.stderr)
        return 2
    if not args.text.is_file():
        raise SystemExit(f"error: --text {args.text}: not found (the held-out text to score; pass --text FILE)")
    ids, bos = eval_ids(args.model, args.text, args.max_tokens)
    print(f"{len(ids)} tokens of {args.text.name}, windows of {args.ctx}", file=sys.stderr)
    ref_model = load_model(args.model, device=args.device, dtype=torch.float32)
    with torch.inference_mode():
        ref = [ref_model(x)[0].float() for x in err_windows(ids, bos, args.ctx, args.err_windows)]
    del ref_model
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant_quality-") as work:
        for e_label, e_spec, method in experts:
            dense_rows = DENSE + (DENSE_4BIT if e_label == "4-bit g64" and not args.quick else [])
            dense_rows = [d for d in dense_rows if not args.dense or d[0] in args.dense]
            for d_label, dense in dense_rows if e_spec is not None else DENSE[:1]:
                rows.append(run_setting(args.model, Path(work), e_label, e_spec, method, d_label, dense, ids, bos,
                                        ref, args))
                r = rows[-1]
                print(f"{e_label:>14} experts, {d_label:>26} dense: {r['bits_per_weight']:.3f} bits/weight, "
                      f"ppl {r['perplexity']:.3f}, logit err {r['rel_logit_error']:.4f}, "
                      f"fused=dequant {r.get('fused_token_agreement')}", file=sys.stderr)
    result = {"model": str(args.model), "text": str(args.text), "ctx": args.ctx, "stride": args.stride or args.ctx // 2,
              "scored_tokens": len(ids), "err_windows": len(ref),
              "device": args.device, "torch": torch.__version__, "rows": rows}
    out = args.out or RESULTS / ("quant_quality-quick.json" if args.quick else "quant_quality.json")
    write_json_atomic(out, result)
    print(table(rows))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
