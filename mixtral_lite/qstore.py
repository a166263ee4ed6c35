"""Read a quantized store written by tools/quantize_experts.py.

A store is a folder:

    config.json, tokenizer.model          copied from the source checkpoint
    dense.safetensors                     embeddings, norms, routers, lm_head in the source dtype
                                          (unchanged bytes); attention projections too, or, with
                                          --attn-bits < 16, one packed uint8 tensor each (HF name)
    experts-0000i-of-0000n.safetensors    one packed uint8 tensor per expert, "layers.{l}.experts.{e}"
    manifest.json                         written last: format + version, quantization settings,
                                          packed layouts, source identity, crc32 per expert

`open_store(path)` gives a `QStore`: the dense tensors through the same interface as
`Checkpoint` (quantized attention is dequantized when read, i.e. at load: the model then
holds it in the compute dtype), plus what the offload engine needs for the experts:
`expert_store("ram" | "mmap")` (each expert's crc32 is verified the first time its bytes
are read) and `codec(device, dtype)` (dequantization on the device, right before the matmul).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from offload.packing import views
from offload.quant import HQQCodec, QuantSpec, expert_layout, layout_from_dict
from offload.store import Piece, RamStore, SafetensorsSource, StoreError

from .checkpoint import CheckpointError, expected_shapes
from .config import ModelConfig

FORMAT = "mixtral-lite-qstore"
VERSION = 1
MANIFEST = "manifest.json"
DENSE = "dense.safetensors"
EXPERT_ROLES = ("w1", "w2", "w3")  # the order swiglu_expert takes them


def expert_tensor(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def expert_matrices(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Shapes of one expert's matrices, in EXPERT_ROLES order (HF: w1, w3 [I, D], w2 [D, I])."""
    i, d = cfg.intermediate_size, cfg.hidden_size
    return {"w1": (i, d), "w2": (d, i), "w3": (i, d)}


def is_quantized_store(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    """The manifest, after checking it is ours and of a version this code reads."""
    file = Path(path) / MANIFEST
    try:
        man = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable manifest ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a mixtral-lite quantized store manifest (format {man.get('format')!r})")
    if man.get("version") != VERSION:
        raise CheckpointError(f"{file}: store format version {man.get('version')!r}, this mixtral-lite reads "
                              f"version {VERSION}; re-run tools/quantize_experts.py on the source checkpoint")
    return man


class ChecksummedSource:
    """Wraps an expert store: each expert's crc32 is checked the first time its bytes are read."""

    def __init__(self, inner, crc32: list[list[int]], files: list[str]):
        self.inner, self.crc32, self.files = inner, crc32, files
        self.layout, self.num_layers, self.num_experts = inner.layout, inner.num_layers, inner.num_experts
        self.pinned, self.host_bytes = inner.pinned, inner.host_bytes
        self._verified: set[tuple[int, int]] = set()

    def pieces(self, layer: int, expert: int) -> list[Piece]:
        ps = self.inner.pieces(layer, expert)
        if (layer, expert) not in self._verified:
            crc = 0
            for p in ps:
                crc = zlib.crc32(p.src.numpy(), crc)
            want = self.crc32[layer][expert]
            if crc != want:
                raise StoreError(f"{self.files[layer][expert]}: layer {layer} expert {expert} fails its checksum "
                                 f"(crc32 {crc:08x}, manifest says {want:08x}): the store is corrupt; "
                                 "re-run tools/quantize_experts.py")
            self._verified.add((layer, expert))
        return ps

    def release(self, layer: int, expert: int) -> None:
        self.inner.release(layer, expert)


class QStore:
    """A quantized store: dense tensors like `Checkpoint`, experts for the offload engine."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.config = ModelConfig.from_dir(self.path)
        if not self.config.is_moe:
            raise CheckpointError(f"{self.path / 'config.json'}: a quantized store needs a Mixtral config")
        ex = self.manifest["experts"]
        self.spec = QuantSpec.from_dict(ex["spec"])
        self.matrices = {k: tuple(v) for k, v in ex["matrices"].items()}
        self.layout = layout_from_dict(ex["layout"])
        self._check_experts(ex)
        att = self.manifest.get("attention")
        self.attn_spec = QuantSpec.from_dict(att["spec"]) if att else None
        self._attn_layouts = {k: layout_from_dict(v) for k, v in att["layouts"].items()} if att else {}
        self._quantized = set(self.manifest["dense"]["quantized"])
        for f in [self.path / DENSE, *self.expert_files()]:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed by {MANIFEST} but missing; the store is incomplete")
        try:
            self._dense = safe_open(str(self.path / DENSE), framework="pt", device="cpu")
        except Exception as e:  # safetensors has its own error types for corrupt files
            raise CheckpointError(f"{self.path / DENSE}: not a readable safetensors file ({e})") from None
        self._expected = {n: s for n, s in expected_shapes(self.config).items() if ".experts." not in n}
        self._check_dense()

    def _check_experts(self, ex: dict) -> None:
        where = self.path / MANIFEST
        if self.matrices != expert_matrices(self.config):
            raise CheckpointError(f"{where}: expert shapes {self.matrices} do not match config.json "
                                  f"({expert_matrices(self.config)})")
        if self.layout != expert_layout(self.matrices, self.spec):
            raise CheckpointError(f"{where}: packed expert layout disagrees with its quantization settings")
        crc = ex["crc32"]
        if len(crc) != self.config.num_layers or any(len(r) != self.config.num_experts for r in crc):
            raise CheckpointError(f"{where}: checksums for {len(crc)} layers, config has "
                                  f"{self.config.num_layers} layers x {self.config.num_experts} experts")

    def _check_dense(self) -> None:
        keys = set(self._dense.keys())
        for name, shape in self._expected.items():
            if name not in keys:
                raise CheckpointError(f"{self.path / DENSE}: tensor {name!r} is missing")
            if name in self._quantized:
                continue
            got = tuple(self._dense.get_slice(name).get_shape())
            if got != shape:
                raise CheckpointError(f"{self.path / DENSE}: tensor {name!r} has shape {got}, config implies {shape}")

    def names(self) -> list[str]:
        """Dense tensor names (HF); the experts are served by `expert_store`."""
        return list(self._expected)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._expected[name]

    def get(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """One dense tensor in dtype on device; quantized attention is dequantized here (at load)."""
        if name not in self._expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not a dense tensor of this store")
        t = self._dense.get_tensor(name)
        if name not in self._quantized:
            return t.to(device=device, dtype=dtype)
        shape = self._expected[name]
        layout = self._attn_layouts[_shape_key(shape)]
        codec = HQQCodec({"w": shape}, self.attn_spec, device, dtype)  # allocates the result: load time only
        return codec.decode(views(t.to(device), layout))[0]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one packed expert: what crosses to the device per miss."""
        return self.layout.nbytes

    def expert_files(self) -> list[Path]:
        return [self.path / f for f in self.manifest["experts"]["shards"]]

    def expert_store(self, kind: str = "mmap", pin: bool = False):
        """The experts' host home for the offload engine: "mmap" (read in place) or "ram" (loaded now)."""
        if kind not in ("mmap", "ram"):
            raise ValueError(f"unknown store {kind!r}: 'mmap' or 'ram'")
        ex = self.manifest["experts"]
        src = SafetensorsSource(self.expert_files(), self.config.num_layers, self.config.num_experts,
                                lambda layer, e: {"packed": expert_tensor(layer, e)}, layout=self.layout)
        per = ex["per_shard"]
        files = [[ex["shards"][(layer * self.config.num_experts + e) // per] for e in range(self.config.num_experts)]
                 for layer in range(self.config.num_layers)]
        checked = ChecksummedSource(src, ex["crc32"], files)
        return checked if kind == "mmap" else RamStore(checked, pin=pin)

    def codec(self, device: torch.device | str, dtype: torch.dtype) -> HQQCodec:
        """Dequantizes one packed expert into (w1, w2, w3) on device in dtype; scratch allocated once."""
        return HQQCodec(self.matrices, self.spec, device, dtype)


def _shape_key(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def open_store(path: str | Path) -> QStore:
    return QStore(path)


__all__ = ["FORMAT", "VERSION", "QStore", "open_store", "is_quantized_store", "read_manifest"]
