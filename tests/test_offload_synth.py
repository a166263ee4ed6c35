"""Synthetic expert checkpoints for the offload tests (helpers, plus a check of the writer).

Experts are stored as separate safetensors tensors `layers.{l}.experts.{e}.{w}`, the
way a Hugging Face checkpoint stores them, with w1/w3 [I, D] and w2 [D, I].
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mixtral_lite.model.experts import run_grouped, swiglu_expert
from offload.codec import PlainCodec
from offload.engine import OffloadEngine
from offload.store import RamStore, SafetensorsSource

ROLES = ("w1", "w2", "w3")
ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def name(layer: int, expert: int, w: str) -> str:
    return f"layers.{layer}.experts.{expert}.{w}"


def shapes(inter: int, dim: int) -> dict[str, tuple[int, int]]:
    return {"w1": (inter, dim), "w2": (dim, inter), "w3": (inter, dim)}


def make_experts(layers: int, experts: int, inter: int, dim: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {name(lay, e, w): (torch.randn(s, generator=g) / s[1] ** 0.5).to(dtype)
            for lay in range(layers) for e in range(experts) for w, s in shapes(inter, dim).items()}


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> list[Path]:
    """safetensors' own writer, split round-robin into `shards` files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    files = []
    for i in range(shards):
        f = folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names[i::shards]}, str(f))
        files.append(f)
    return files


def write_streaming(path: Path, layers: int, experts: int, inter: int, dim: int, dtype=torch.float16) -> int:
    """A large checkpoint written one tensor at a time (never all in memory); returns expert bytes."""
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for lay in range(layers):
        for e in range(experts):
            for w, s in shapes(inter, dim).items():
                n = s[0] * s[1] * item
                header[name(lay, e, w)] = {"dtype": ST_NAMES[dtype], "shape": list(s),
                                           "data_offsets": [offset, offset + n]}
                offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in header:
            f.write(torch.full(tuple(header[key]["shape"]), 0.5, dtype=dtype).view(torch.uint8).numpy().tobytes())
    return offset // (layers * experts)


def open_source(files: list[Path], layers: int, experts: int, inter: int, dim: int) -> SafetensorsSource:
    return SafetensorsSource(files, layers, experts, lambda lay, e: {w: name(lay, e, w) for w in ROLES},
                             shapes(inter, dim))


def make_engine(files, layers, experts, inter, dim, *, slots, store="mmap", prefetch=True,
                dtype=torch.float32, policy="lru", device="cpu", transfer=None, pinner=None,
                miss_policy=None, host_thread=None, pool="layer", prefetch_budget=None) -> OffloadEngine:
    """pinner: page-locks the RAM store with it (a fake's, on the CPU) instead of only on CUDA."""
    source = open_source(files, layers, experts, inter, dim)
    pin = {"pin": True, "pinner": pinner} if pinner else {"pin": device == "cuda"}
    host = RamStore(source, **pin) if store == "ram" else source
    codec = PlainCodec(host.layout, ROLES, dtype, device)
    return OffloadEngine(host, codec, swiglu_expert, slots, device, policy=policy, prefetch=prefetch,
                         transfer=transfer, miss_policy=miss_policy, host_thread=host_thread, pool=pool,
                         prefetch_budget=prefetch_budget)


def reference(tensors, layer: int, x, ids_host, weights, dtype=torch.float32):
    """All experts resident: run_grouped over the original tensors."""
    def get(e):
        return tuple(tensors[name(layer, e, w)].to(dtype) for w in ROLES)
    return run_grouped(x, ids_host, weights, get)


def test_writers_agree_with_safetensors(tmp_path):
    tensors = make_experts(1, 2, 8, 4, torch.float16)
    for dtype in (torch.float16, torch.bfloat16):
        write_streaming(tmp_path / "s.safetensors", 1, 2, 8, 4, dtype)
        loaded = load_file(str(tmp_path / "s.safetensors"))
        assert set(loaded) == set(tensors)
        assert all(t.dtype == dtype and torch.all(t == 0.5) for t in loaded.values())
