"""Write a random, Mixtral-shaped Hugging Face checkpoint (no model hub here, so benchmarks need one).

    python tools/make_synthetic_checkpoint.py OUT --preset {mixtral-1/8,mixtral-4l,tiny} [--seed 0] [--dtype bfloat16]

OUT gets config.json (real Mixtral style: top-level rope_theta and torch_dtype), tokenizer.model (the real
Mixtral tokenizer, copied from mistral_common) and model.safetensors, or shards of at most ~2 GB
(model-0000i-of-0000N.safetensors) with model.safetensors.index.json. Tensor names are Mixtral's own.

Presets (L = layers, E = experts, D = hidden, I = intermediate, H/KV = heads, hd = head_dim, V = vocab):

- `mixtral-1/8`: Mixtral-8x7B's depth, expert count and routing at 1/8 of its width, keeping head_dim 128:
  L=32, E=8, top-2, V=32000, D=512, I=1792, H=4, KV=1, hd=128, rope_theta 1e6, no sliding window.
  Shapes: embed_tokens and lm_head [32000, 512]; per layer q_proj [512, 512], k_proj and v_proj [128, 512],
  o_proj [512, 512], input/post_attention layernorm [512], gate (router) [8, 512], and per expert
  w1, w3 [1792, 512], w2 [512, 1792]; final norm [512]. 758.5M parameters: 1.52 GB in bfloat16
  (one model.safetensors), 3.04 GB in float32 (two shards). One expert is 2.75M parameters (5.5 MB bf16).
- `tiny`: L=2, E=4, top-2, V=32000 (the real tokenizer), D=64, I=128, H=4, KV=2, hd=16: for tests.
- `mixtral-4l`: Mixtral-8x7B's real widths (D=4096, I=14336, H=32, KV=8, hd=128, E=8, top-2, V=32000) and
  4 of its 32 layers: 6.1B parameters, 12.2 GB in bfloat16 (7 shards); one expert is 176M parameters
  (352 MB bf16). For benchmarks at the width that matters; fp32 of it does not fit in 24 GB.
- `mixtral-8x7b`: Mixtral-8x7B's own shape (L=32, the widths above): 46.7B parameters, 93 GB in bfloat16.
  Too big to write here; tools/make_synthetic_store.py quantizes its tensors as they are made instead.

Weights are N(0, 0.02) (transformers' initializer_range), norms are 1, so activations stay O(1) through
all layers. Each tensor is drawn from its own generator seeded by (seed, tensor index): the result does not
depend on sharding. Tensors are generated and written one at a time, straight into the safetensors file
(the header is computed first from the shapes), so memory stays at about one tensor. Everything is
written into a temporary folder next to OUT that is renamed to OUT at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

PRESETS = {
    "mixtral-1/8": dict(vocab=32000, hidden=512, intermediate=1792, layers=32, heads=4, kv_heads=1, experts=8),
    "tiny": dict(vocab=32000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, experts=4),
    "mixtral-4l": dict(vocab=32000, hidden=4096, intermediate=14336, layers=4, heads=32, kv_heads=8, experts=8),
    "mixtral-8x7b": dict(vocab=32000, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, experts=8),
}
DTYPES = {"bfloat16": (torch.bfloat16, "BF16"), "float32": (torch.float32, "F32")}
INIT_STD = 0.02
MAX_SHARD_BYTES = 2 * 10**9


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    is_norm: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def hf_config(p: dict, dtype: str) -> dict:
    """config.json as Mistral AI wrote it for Mixtral-8x7B, with the preset's sizes."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": p["hidden"],
        "initializer_range": INIT_STD,
        "intermediate_size": p["intermediate"],
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": p["heads"],
        "num_experts_per_tok": 2,
        "num_hidden_layers": p["layers"],
        "num_key_value_heads": p["kv_heads"],
        "num_local_experts": p["experts"],
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": p["vocab"],
    }


def tensor_specs(p: dict) -> list[Spec]:
    """Every tensor of the checkpoint, in Mixtral's order, with its shape."""
    d, i, v = p["hidden"], p["intermediate"], p["vocab"]
    q, kv = d, d // p["heads"] * p["kv_heads"]  # head_dim = hidden / heads, as in Mixtral's config
    specs = [Spec("model.embed_tokens.weight", (v, d))]
    for layer in range(p["layers"]):
        pre = f"model.layers.{layer}."
        specs += [
            Spec(pre + "input_layernorm.weight", (d,), is_norm=True),
            Spec(pre + "self_attn.q_proj.weight", (q, d)),
            Spec(pre + "self_attn.k_proj.weight", (kv, d)),
            Spec(pre + "self_attn.v_proj.weight", (kv, d)),
            Spec(pre + "self_attn.o_proj.weight", (d, q)),
            Spec(pre + "post_attention_layernorm.weight", (d,), is_norm=True),
            Spec(pre + "block_sparse_moe.gate.weight", (p["experts"], d)),
        ]
        for e in range(p["experts"]):
            ex = f"{pre}block_sparse_moe.experts.{e}."
            specs += [Spec(ex + "w1.weight", (i, d)), Spec(ex + "w2.weight", (d, i)), Spec(ex + "w3.weight", (i, d))]
    return specs + [Spec("model.norm.weight", (d,), is_norm=True), Spec("lm_head.weight", (v, d))]


def make_tensor(spec: Spec, index: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    if spec.is_norm:
        return torch.ones(spec.shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return (torch.randn(spec.shape, generator=gen) * INIT_STD).to(dtype)


def plan_shards(specs: list[Spec], elem_bytes: int, max_bytes: int) -> list[list[int]]:
    """Consecutive tensor indices per shard, each shard at most max_bytes (or one oversized tensor)."""
    shards: list[list[int]] = [[]]
    size = 0
    for k, spec in enumerate(specs):
        nbytes = spec.numel * elem_bytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    return shards


def write_safetensors(path: Path, specs: list[Spec], indices: list[int], seed: int, dtype: str) -> None:
    """Stream tensors `indices` into one safetensors file: header from the shapes, then data in order."""
    torch_dtype, st_dtype = DTYPES[dtype]
    elem = torch.empty((), dtype=torch_dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k in indices:
        end = offset + specs[k].numel * elem
        header[specs[k].name] = {"dtype": st_dtype, "shape": list(specs[k].shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in indices:
            t = make_tensor(specs[k], k, seed, torch_dtype)
            f.write(t.contiguous().view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(
    out: Path, preset: str, seed: int = 0, dtype: str = "bfloat16", max_shard_bytes: int = MAX_SHARD_BYTES
) -> Path:
    """Write the whole checkpoint atomically to `out`; return it."""
    if out.exists():
        raise FileExistsError(f"OUT {out} already exists; remove it or choose another path")
    if preset not in PRESETS or dtype not in DTYPES:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)} and --dtype one of {sorted(DTYPES)}")
    tokenizer = Path(str(files("mistral_common") / "data" / "tokenizer.model.v1"))
    p = PRESETS[preset]
    specs = tensor_specs(p)
    elem = torch.empty((), dtype=DTYPES[dtype][0]).element_size()
    shards = plan_shards(specs, elem, max_shard_bytes)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config(p, dtype), indent=2) + "\n")
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
        )
        for name, indices in zip(names, shards, strict=True):
            write_safetensors(tmp / name, specs, indices, seed, dtype)
        if len(shards) > 1:
            weight_map = {specs[k].name: name for name, ix in zip(names, shards, strict=True) for k in ix}
            index = {"metadata": {"total_size": sum(s.numel for s in specs) * elem}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to create (must not exist)")
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("-s", "--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--max-shard-bytes", type=int, default=MAX_SHARD_BYTES, help="split into shards above this")
    args = ap.parse_args(argv)
    try:
        out = write_checkpoint(args.out, args.preset, args.seed, args.dtype, args.max_shard_bytes)
    except (FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    n = sum(s.numel for s in tensor_specs(PRESETS[args.preset]))
    print(f"wrote {out}: {args.preset}, {n / 1e6:.1f}M parameters, {args.dtype}", file=sys.stderr)


if __name__ == "__main__":
    main()
