"""Write a Mixtral-shaped Q4_0 GGUF straight from seeded random codes, for llama.cpp: no f16 file first.

    python benchmarks/gguf_synthetic.py OUT.gguf --preset mixtral-8x7b [--seed 0]

llama.cpp's quantizer needs an f16 GGUF to start from (93 GB for Mixtral-8x7B, more than this disk
holds), so this writes the quantized blocks themselves, in the tensor types `llama-quantize ... Q4_0`
gives an 8-expert model: Q4_0 for the experts, token_embd, attn_q and attn_output; Q8_0 for attn_k and
attn_v (llama.cpp bumps those for n_expert == 8); Q6_K for `output` (Q8_0 when a row is not a multiple
of 256, as llama.cpp does); f32 for the norms (ones) and the routers (N(0, 0.02)). Block contents are
uniform random codes with per-block fp16 scales of random sign, so the weights have mean 0 and std ~0.02, like
make_synthetic_checkpoint's N(0, 0.02); each tensor has its own generator seeded by (seed, index).
Names, metadata and vocabulary (the real Mixtral tokenizer from mistral_common) are gguf_export's.

The weights are not those of make_synthetic_store.py's store (a different quantizer could not give
the same ones anyway): speed, memory and disk traffic do not depend on the values; the text does.
Tensors are made and written one at a time (peak: one layer's stack of one expert matrix, ~0.3 GB at
full size); the file is written to OUT.tmp, then renamed. Needs the `gguf` package.
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # scripts folders, not packages
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_export import Entry, gguf_writer, plan, write_metadata, write_tensors  # noqa: E402
from make_synthetic_checkpoint import INIT_STD, PRESETS, hf_config  # noqa: E402

from mixtral_lite.model.config import ModelConfig  # noqa: E402

QK_K = 256  # weights per Q6_K super-block
Q4_STD = ((16**2 - 1) / 12) ** 0.5  # std of uniform codes 0..15 (q - 8)
Q8_STD = ((256**2 - 1) / 12) ** 0.5  # std of uniform int8 codes
Q6_STD = ((64**2 - 1) / 12) ** 0.5  # std of uniform 6-bit codes (q - 32)
Q6_SCALES = (12, 21)  # int8 sub-block scales drawn from [12, 21)


def tensor_type(name: str, shape: tuple[int, ...]) -> str:
    """The GGML type llama.cpp's Q4_0 quantization gives this tensor of an 8-expert model."""
    if len(shape) == 1 or "ffn_gate_inp" in name:
        return "F32"
    if name == "output.weight":
        return "Q6_K" if shape[-1] % QK_K == 0 else "Q8_0"
    if "attn_k." in name or "attn_v." in name:
        return "Q8_0"
    return "Q4_0"


def scales(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """n fp16 block scales of magnitude INIT_STD / std (+-25%) and random sign, as [n, 2] bytes.

    The sign matters: uniform codes have mean -0.5 (q - 8 over 0..15), so with positive scales every weight
    would share a bias of -0.5 d, the residual stream would grow along one direction, and greedy decoding
    would repeat one token (same experts every step: an all-cached run). llama.cpp's own d = max / -8 takes
    either sign too.
    """
    d = rng.uniform(0.75, 1.25, n) * np.where(rng.random(n) < 0.5, -1.0, 1.0) * (INIT_STD / std)
    return d.astype(np.float16).view(np.uint8).reshape(n, 2)


def random_bytes(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(n * width), np.uint8).reshape(n, width)


def blocks(rng: np.random.Generator, qtype: str, n: int) -> np.ndarray:
    """n random blocks of qtype as [n, block bytes] (gguf's layouts: ggml-common.h)."""
    if qtype == "Q4_0":  # d, then 16 bytes: weight j = low nibble of byte j, weight 16 + j = high nibble
        return np.concatenate([scales(rng, n, Q4_STD), random_bytes(rng, n, 16)], axis=1)
    if qtype == "Q8_0":  # d, then 32 int8 codes
        return np.concatenate([scales(rng, n, Q8_STD), random_bytes(rng, n, 32)], axis=1)
    if qtype == "Q6_K":  # ql (low 4 bits), qh (high 2 bits), 16 int8 scales, d
        sub = rng.integers(*Q6_SCALES, size=(n, QK_K // 16), dtype=np.int8).view(np.uint8)
        d = scales(rng, n, Q6_STD * sum(Q6_SCALES) / 2)
        return np.concatenate([random_bytes(rng, n, QK_K // 2), random_bytes(rng, n, QK_K // 4), sub, d], axis=1)
    raise ValueError(f"no generator for {qtype}")


def make_tensor(entry: Entry, index: int, seed: int) -> np.ndarray:
    """Tensor `index` of the plan: f32 values, or quantized blocks as uint8 [..., row bytes]."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    rng = np.random.default_rng([seed, index])
    qtype = tensor_type(entry.name, entry.shape)
    if qtype == "F32":
        if len(entry.shape) == 1:  # norms are 1, as in make_synthetic_checkpoint
            return np.ones(entry.shape, np.float32)
        return rng.normal(0.0, INIT_STD, entry.shape).astype(np.float32)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    *lead, cols = entry.shape
    if cols % block:
        raise ValueError(f"{entry.name}: rows of {cols} are not a multiple of {qtype}'s {block}")
    n = int(np.prod(entry.shape)) // block
    return blocks(rng, qtype, n).reshape(*lead, cols // block * size)


def config(preset: str | dict) -> ModelConfig:
    """The ModelConfig of a make_synthetic_checkpoint preset (a name, or its dict of sizes)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    return ModelConfig.from_dict(hf_config(p, "bfloat16"), f"preset {preset}")


def write(out: str | Path, preset: str | dict = "mixtral-8x7b", seed: int = 0) -> Path:
    """Write the GGUF file; returns its path."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    cfg, out = config(preset), Path(out)
    entries = plan(cfg)
    tokenizer = Path(str(files("mistral_common") / "data" / "tokenizer.model.v1"))
    with gguf_writer(out) as writer:
        name = preset if isinstance(preset, str) else "custom"
        write_metadata(writer, cfg, f"synthetic-{name}-seed{seed}", tokenizer, LlamaFileType.MOSTLY_Q4_0)
        for e in entries:  # the header lists every tensor before any data is written
            qtype = tensor_type(e.name, e.shape)
            if qtype == "F32":
                writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), int(np.prod(e.shape)) * 4)
                continue
            raw = GGMLQuantizationType[qtype]
            block, size = GGML_QUANT_SIZES[raw]
            byte_shape = (*e.shape[:-1], e.shape[-1] // block * size)  # the writer turns it back into weights
            writer.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=raw)
        write_tensors(writer, (make_tensor(e, i, seed) for i, e in enumerate(entries)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="GGUF file to write")
    p.add_argument("--preset", default="mixtral-8x7b", choices=sorted(PRESETS))
    p.add_argument("-s", "--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = write(args.out, args.preset, args.seed)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
