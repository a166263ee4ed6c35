"""Hugging Face Mixtral or Mistral checkpoint -> quantized store that `generate -m DST` runs directly.

    python tools/quantize_experts.py SRC DST --bits 4 [--method rtn] [--attn-bits 4] [--head-bits 8] [--resume]

Experts (and a dense Mistral's MLPs) are quantized one at a time, with hqq's half-quadratic
optimiser or, with --method rtn, plain round-to-nearest into the same format (offload/quant.py),
groups along the input dimension (what torch's fused int4 kernels read), and streamed into
safetensors shards of about --shard-mb MB: peak memory is one expert's
source tensors plus its packed bytes, never the checkpoint. Every packed expert has the
same size, so a shard's header is known up front and is written first, then the experts.

Crash safety: files are written under temporary names (*.partial) and renamed when
complete; a journal (.quantize-journal.jsonl) records each expert once its bytes are
flushed; manifest.json is written last, atomically, and only it makes DST a store.
`--resume` checks the journal's settings and source identity (files' sizes and mtimes), truncates the partial shard
after the last journaled expert (checking the kept experts' crc32) and continues. Output is
deterministic: an interrupted then resumed run gives the same bytes as an uninterrupted one.

Defaults, chosen to sit beside llama.cpp's Q4_0 (4.5 bits/weight for experts, attention and
embeddings, Q6_K for the output layer): experts 4-bit g64 (4.28 bits/weight with 8-bit scale and
zero), attention 4-bit g64 (4.5), lm_head and embeddings int8 with one scale per row (8.0).
Norms and routers are copied in their source dtype, bytes unchanged (bf16 for the real Mixtral);
so is any tensor whose flag is 16. Every dense tensor gets a crc32 in the manifest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ is a folder of scripts, not a package

from mixtral_lite.model.quant_defaults import DEFAULT_GROUP  # noqa: E402  (torch-free; the dry run plans with it too)

LAZY = ("convert", "Converter", "QuantizeError", "InjectedFailure", "JOURNAL", "source_identity", "run_converter")


def __getattr__(name: str):
    """The writer's names (convert, QuantizeError, ...), imported on first use: `--help` and flag errors
    answer before torch is imported."""
    if name in LAZY:
        import store_converter

        return getattr(store_converter, name)
    raise AttributeError(name)


def _settings(a):
    """(expert QuantSpec, DenseSettings) from the flags."""
    from mixtral_lite.model.qstore import DenseSettings
    from offload.kernels import INT4_GROUPS
    from offload.quant import QuantSpec

    group = DEFAULT_GROUP[a.bits] if a.group_size is None else a.group_size  # 0 is an error, not "default"
    spec = QuantSpec(a.bits, group, a.axis, a.meta_bits)
    if spec.bits <= 4 and (spec.axis != 1 or spec.group_size not in INT4_GROUPS):
        print(f"warning: --bits {spec.bits} --group-size {spec.group_size} --axis {spec.axis}: torch's fused int4 "
              f"kernel needs --axis 1 and a group size in {INT4_GROUPS}; this store will be dequantized at every "
              "use (several times slower)", file=sys.stderr)
    attn = QuantSpec(4, 64 if a.attn_group_size is None else a.attn_group_size, 1, 16) if a.attn_bits == 4 else None
    return spec, DenseSettings(attn, a.attn_bits == 8, a.head_bits, a.embed_bits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="Hugging Face Mixtral or Mistral checkpoint folder")
    p.add_argument("dst", type=Path, help="output store folder (empty, or an interrupted run with --resume)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4,
                   help="expert (and dense MLP) weight bits (default 4)")
    p.add_argument("--group-size", type=int, help="weights per scale/zero (default: 2->32, 3->128, 4->64, 8->128)")
    p.add_argument("--method", choices=("hqq", "hqq-fast", "rtn"), default="hqq",  # offload.quant.METHODS
                   help="hqq: hqq's half-quadratic optimiser (best quality, 26-98 s per full-size matrix on a "
                        "CPU); hqq-fast: the same optimiser in cache-sized chunks (offload/hqq_fast.py, ~3x "
                        "faster); rtn: round-to-nearest min-max, same format, ~0.5 s per full-size matrix")
    p.add_argument("--axis", type=int, choices=(0, 1), default=1,
                   help="hqq grouping axis (default 1: groups along the input, what the fused kernels read)")
    p.add_argument("--meta-bits", type=int, choices=(8, 16), default=8,
                   help="scale/zero storage: 8 = quantized (default), 16 = hqq's fp16")
    p.add_argument("--attn-bits", type=int, choices=(16, 8, 4), default=4,
                   help="attention projections: 4 = int4 g64 (default), 8 = int8 per row, 16 = source dtype")
    p.add_argument("--attn-group-size", type=int, help="int4 attention group size (default 64)")
    p.add_argument("--head-bits", type=int, choices=(16, 8), default=8, help="lm_head: 8 = int8 per row (default)")
    p.add_argument("--embed-bits", type=int, choices=(16, 8), default=8,
                   help="token embeddings: 8 = int8 per row (default)")
    p.add_argument("--prepack", action="store_true",
                   help="store the experts in the CPU int4 kernel's own layout (offload/prepacked.py): nothing is "
                        "converted at load or per miss, and on the CPU the kernel reads the mapped file in place; "
                        "4-bit g64 takes 4.5 bits a weight instead of 4.27")
    p.add_argument("--shard-mb", type=int, default=2000, help="expert shard size (default 2000 MB)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in DST")
    p.add_argument("--device", help="device for the quantizer's arithmetic (default: cuda if available, else cpu)")
    a = p.parse_args(argv)
    from store_writing import Progress  # torch and the writer only now: --help answers at once

    try:
        return _run(a)
    finally:
        Progress.line_open = False


def _run(a) -> int:
    import torch
    from quantize_checks import check_flags
    from store_converter import QuantizeError, convert

    from mixtral_lite.model.checkpoint import CheckpointError

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_flags(a)
        spec, dense = _settings(a)
        convert(a.src, a.dst, spec, dense, a.shard_mb << 20, a.resume, a.device, method=a.method,
                prepack=a.prepack)
    except (QuantizeError, CheckpointError, ValueError) as e:
        _error(str(e))
        return 2
    except OSError as e:  # disk full, permissions: the journal keeps what was done
        where = f"{e.filename}: " if e.filename else f"writing {a.dst}: "
        _error(f"{where}{e.strerror or e}; fix it and run the same command with --resume to continue "
               "(finished experts are kept)")
        return 2
    except KeyboardInterrupt:
        _error(f"interrupted; run the same command with --resume to continue in {a.dst}")
        return 130
    print(f"wrote {a.dst}", file=sys.stderr)
    return 0


def _error(message: str) -> None:
    from store_writing import Progress

    print(("\n" if Progress.line_open else "") + f"error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
