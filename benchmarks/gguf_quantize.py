"""Write a Hugging Face Mixtral (or Mistral) checkpoint as a quantized GGUF, for tests and comparisons.

    python benchmarks/gguf_quantize.py HF_DIR OUT.gguf --type Q4_0|Q4_1|Q5_0|Q8_0|Q4_K|Q5_K|Q6_K|Q4_K_M
                                       [--set TENSOR=TYPE ...]

Names, metadata and vocabulary are gguf_export's (llama.cpp's layout). Norms and routers stay F32; every
matrix gets --type, or with Q4_K_M the mix llama-quantize gives Mixtral-8x7B: Q4_K, with attn_k and attn_v
in Q8_0 and attn_output in Q5_K when there are 8 experts, output in Q6_K, and ffn_down in Q6_K on the
layers llama.cpp's use_more_bits picks (the first and last eighth, every third between). --set overrides
one tensor's type (e.g. blk.1.ffn_down_exps.weight=Q6_K). Legacy types come from gguf-py's quantizers,
K types from gguf_kquants.py (plain min-max scales, not llama.cpp's search). Needs the `gguf` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_export import Entry, gguf_writer, plan, read, write_metadata, write_tensors  # noqa: E402
from gguf_kquants import QUANTIZERS  # noqa: E402
from gguf_kquants import quantize as kquantize  # noqa: E402

from mixtral_lite.model.checkpoint import Checkpoint  # noqa: E402

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M", "F16", "F32")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers whose ffn_down gets more bits in the _M mixes."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], qtype: str, n_layers: int, n_experts: int) -> str:
    """The GGML type of one tensor for --type qtype."""
    if len(shape) == 1 or "ffn_gate_inp" in name:
        return "F32"
    if qtype != "Q4_K_M":
        return qtype
    stem = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]  # blk.N.STEM[.E].weight
    if name == "output.weight":
        return "Q6_K"
    if stem in ("attn_k", "attn_v") and n_experts == 8:
        return "Q8_0"
    if stem == "attn_output" and n_experts == 8:
        return "Q5_K"
    if stem.startswith("ffn_down") and use_more_bits(int(name.split(".")[1]), n_layers):
        return "Q6_K"
    return "Q4_K"


def quantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [..., K] -> the tensor's stored form: float arrays for F32/F16, uint8 blocks otherwise."""
    from gguf import GGMLQuantizationType
    from gguf import quants as gq

    if qtype in ("F32", "F16"):
        return data.astype(np.float32 if qtype == "F32" else np.float16)
    if qtype in QUANTIZERS:
        return kquantize(data, qtype)
    return gq.quantize(data.astype(np.float32), GGMLQuantizationType[qtype])


def per_expert(entries: list[Entry]) -> list[Entry]:
    """The layout of GGUFs converted before mid-2024: one tensor per expert (blk.N.ffn_gate.E.weight ...)."""
    out = []
    for e in entries:
        if "_exps." not in e.name:
            out.append(e)
            continue
        stem = e.name.removesuffix("_exps.weight")
        out += [Entry(f"{stem}.{i}.weight", e.shape[1:], (src,)) for i, src in enumerate(e.sources)]
    return out


def write(model_dir: str | Path, out: str | Path, qtype: str = "Q4_0", overrides: dict[str, str] | None = None,
          legacy_experts: bool = False, strings: dict[str, str] | None = None) -> Path:
    """Write the GGUF file; returns its path. legacy_experts: one tensor per expert (older converters);
    strings: metadata fields added (e.g. tokenizer.chat_template)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    if qtype not in TYPES:
        raise ValueError(f"--type {qtype}: one of {TYPES}")
    model_dir, out = Path(model_dir), Path(out)
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    entries = per_expert(plan(cfg)) if legacy_experts else plan(cfg)
    types = {e.name: tensor_type(e.name, e.shape, qtype, cfg.num_layers, cfg.num_experts) for e in entries}
    for name, t in (overrides or {}).items():
        if name not in types:
            raise ValueError(f"--set {name}: no such tensor in the file")
        types[name] = t
    file_type = {"Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S", "F32": "ALL_F32"}.get(qtype, f"MOSTLY_{qtype}")
    with gguf_writer(out) as writer:
        write_metadata(writer, cfg, model_dir.name, model_dir / "tokenizer.model", LlamaFileType[file_type])
        for key, value in (strings or {}).items():
            writer.add_string(key, value)
        for e in entries:
            t = types[e.name]
            if t in ("F32", "F16"):
                dt = np.dtype(np.float32 if t == "F32" else np.float16)
                writer.add_tensor_info(e.name, e.shape, dt, int(np.prod(e.shape)) * dt.itemsize)
                continue
            raw = GGMLQuantizationType[t]
            block, size = GGML_QUANT_SIZES[raw]
            if e.shape[-1] % block:
                raise ValueError(f"{e.name}: rows of {e.shape[-1]} weights are not a multiple of {t}'s {block}")
            byte_shape = (*e.shape[:-1], e.shape[-1] // block * size)
            writer.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=raw)
        write_tensors(writer, (quantize(read(ckpt, e, np.dtype(np.float32)), types[e.name]) for e in entries))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--type", default="Q4_0", choices=TYPES)
    p.add_argument("--set", action="append", default=[], metavar="TENSOR=TYPE", help="one tensor's type")
    p.add_argument("--per-expert", action="store_true", help="one tensor per expert, as files made before mid-2024")
    args = p.parse_args(argv)
    overrides = dict(s.split("=", 1) for s in args.set)
    path = write(args.model_dir, args.out, args.type, overrides, args.per_expert)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
