"""Read a quantized store written by tools/quantize_experts.py.

A store is a folder:

    config.json, tokenizer.model          copied from the source checkpoint
    dense.safetensors                     every non-expert tensor under its HF name: in the source
                                          dtype (unchanged bytes), or quantized as one packed uint8
                                          tensor (offload/qdense.py: int4 attention / dense MLP,
                                          int8 lm_head and embeddings)
    experts-0000i-of-0000n.safetensors    one packed uint8 tensor per expert, "layers.{l}.experts.{e}"
                                          (Mixtral only; a dense Mistral store has none)
    manifest.json                         written last: format + version, quantization settings,
                                          packed layouts, source identity, a crc32 per expert and
                                          per dense tensor

`open_store(path)` gives a `QStore`: the plain dense tensors through the same interface as
`Checkpoint`, the quantized ones through `quantized` / `packed(name)` (mixtral_lite/qweights.py
turns them into fused-kernel projections at load), plus what the offload engine needs for the
experts: `expert_store("ram" | "mmap")` (each expert's crc32 is verified the first time its
bytes are read) and `codec(device, dtype)`: torch's fused int4 kernel reading a slot converted
once at load, or, where that kernel does not exist, dequantization right before the matmul.

Version 2 groups every int4 matrix along its input dimension (what the fused kernels read);
version 1 stores (dequantized at every use) are refused with the command that re-makes them.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from offload.fused import FusedCodec, fused_unsupported, kernel_layout, output_matrices, rows_unsupported
from offload.kernels import CpuInt4Layout
from offload.packing import Layout
from offload.prepacked import PACKINGS, PrepackedCodec, prepack_unsupported, stored_cpu_layout
from offload.qdense import dense_layout, dequantized
from offload.quant import HQQCodec, QuantSpec, expert_layout, layout_from_dict
from offload.store import Piece, RamStore, SafetensorsSource, StoreError

from .checkpoint import CheckpointError, expected_shapes, header_problem
from .config import ModelConfig
from .qplan import DenseSettings, dense_device_bytes

FORMAT = "mixtral-lite-qstore"
VERSION = 2
MANIFEST = "manifest.json"
DENSE = "dense.safetensors"
EXPERT_ROLES = ("w1", "w2", "w3")  # the order swiglu_expert takes them
STACK = {"w13": ("w1", "w3")}  # one kernel matrix for the up-projections: (w13, w2) per expert


CODECS = ("prepacked", "fused", "dequantize")


def codec_kind(matrices: dict[str, tuple[int, int]], spec: QuantSpec, cpu_layout, device: torch.device | str,
               fused: bool = True) -> tuple[str, str | None]:
    """Which expert codec a store runs on `device` (one of CODECS) and, for "dequantize", why no fused kernel."""
    if cpu_layout is not None:
        why = prepack_unsupported(matrices, spec, device, STACK) if fused else \
            "the dequantize-then-multiply path reads hqq's layout only"
        if why:
            raise CheckpointError(f"experts stored in a CPU int4 kernel's layout (--prepack) cannot run on "
                                  f"{torch.device(device).type} here: {why}; re-make the store without --prepack")
        return "prepacked", None
    why = fused_unsupported(matrices, spec, device) if fused else "asked for"
    return ("fused", None) if why is None else ("dequantize", why)
ST_TAG = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}


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
                              f"version {VERSION} (fused int4 kernels); re-make it with "
                              "`python tools/quantize_experts.py SRC DST --bits 4` from the source checkpoint")
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


@dataclass(frozen=True)
class ExpertFormat:
    """How a store's experts are stored: what its manifest says, checked against config.json (no file read)."""

    matrices: dict[str, tuple[int, int]]
    spec: QuantSpec
    packing: str  # "hqq", or a CPU int4 kernel layout (--prepack)
    cpu_layout: CpuInt4Layout | None  # None: hqq's layout
    layout: Layout  # one packed expert as stored


def expert_format(man: dict, cfg: ModelConfig, where: Path) -> ExpertFormat | None:
    """The manifest's experts (None for a dense Mistral store); errors name the manifest."""
    ex = man.get("experts")
    if cfg.is_moe != (ex is not None):
        raise CheckpointError(f"{where}: {'no ' if ex is None else ''}experts listed, but "
                              f"config.json describes a {'Mixtral' if cfg.is_moe else 'dense Mistral'}")
    if ex is None:
        return None
    try:
        spec = QuantSpec.from_dict(ex["spec"])
        matrices = {k: tuple(v) for k, v in ex["matrices"].items()}
        packing = ex.get("packing", "hqq")
        layout = layout_from_dict(ex["layout"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: the experts' entry is malformed ({type(e).__name__}: {e})") from None
    cpu_layout = stored_cpu_layout(packing)
    if cpu_layout is not None and not layout.form:  # written before layouts had forms
        layout = replace(layout, form=f"int4-cpu-{cpu_layout.name}")
    if matrices != expert_matrices(cfg):
        raise CheckpointError(f"{where}: expert shapes {matrices} do not match config.json "
                              f"({expert_matrices(cfg)})")
    if cpu_layout is not None:
        _, names, out_shapes = output_matrices(matrices, STACK)
        want = kernel_layout(names, out_shapes, spec.group_size, "cpu", cpu_layout)
    elif packing == "hqq":
        want = expert_layout(matrices, spec)
    else:
        raise CheckpointError(f"{where}: expert packing {packing!r} is not one this mixtral-lite reads "
                              f"(hqq, {', '.join(PACKINGS)})")
    if layout != want:
        raise CheckpointError(f"{where}: packed expert layout disagrees with its quantization settings")
    crc = ex.get("crc32")
    if not isinstance(crc, list) or len(crc) != cfg.num_layers or any(
            not isinstance(r, list) or len(r) != cfg.num_experts for r in crc):
        raise CheckpointError(f"{where}: checksums for {len(crc) if isinstance(crc, list) else 'no'} layers, "
                              f"config has {cfg.num_layers} layers x {cfg.num_experts} experts")
    return ExpertFormat(matrices, spec, packing, cpu_layout, layout)


def dense_kinds(man: dict, where: Path) -> dict[str, tuple[str, QuantSpec | None]]:
    """{dense tensor: (kind, int4 settings)} of the quantized dense tensors the manifest lists."""
    try:
        return {n: (t["kind"], QuantSpec.from_dict(t["spec"]) if "spec" in t else None)
                for n, t in man["dense"]["tensors"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: the dense entry is malformed ({type(e).__name__}: {e})") from None


def rows_unavailable(matrices: dict[str, tuple[int, int]], spec: QuantSpec, cpu_layout) -> str | None:
    """Why these experts cannot be held in the int4-rows layout the CUDA table kernels read (None: they can)."""
    why = rows_unsupported(matrices, spec)
    if why is None and cpu_layout is not None:
        why = prepack_unsupported(matrices, spec, "cpu", STACK)
    return why


class QStore:
    """A quantized store: dense tensors like `Checkpoint`, experts for the offload engine."""

    def __init__(self, path: str | Path, fused: bool = True):
        self.path, self.fused = Path(path), fused  # fused=False: the dequantize-then-multiply reference path
        self.manifest = read_manifest(self.path)
        self.config = ModelConfig.from_dir(self.path)
        fmt = expert_format(self.manifest, self.config, self.path / MANIFEST)
        if fmt is not None:
            self.spec, self.matrices, self.packing = fmt.spec, fmt.matrices, fmt.packing
            self.cpu_layout, self.layout = fmt.cpu_layout, fmt.layout  # cpu_layout None: hqq's layout
        kinds = dense_kinds(self.manifest, self.path / MANIFEST)
        self.quantized: dict[str, str] = {n: k for n, (k, _) in kinds.items()}
        self._dense_specs = {n: spec for n, (_, spec) in kinds.items() if spec is not None}
        self._dense_crc = self.manifest["dense"].get("crc32", {})
        self._verified: set[str] = set()
        for f in [self.path / DENSE, *self.expert_files()]:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed by {MANIFEST} but missing; the store is incomplete")
        try:
            self._dense = safe_open(str(self.path / DENSE), framework="pt", device="cpu")
        except Exception as e:  # safetensors has its own error types for corrupt files
            why = header_problem(self.path / DENSE) or str(e).strip().splitlines()[0]
            raise CheckpointError(f"{self.path / DENSE}: not a readable safetensors file ({why})") from None
        self._expected = {n: s for n, s in expected_shapes(self.config).items() if ".experts." not in n}
        self._check_dense()

    def _check_dense(self) -> None:
        keys = set(self._dense.keys())
        for name, shape in self._expected.items():
            if name not in keys:
                raise CheckpointError(f"{self.path / DENSE}: tensor {name!r} is missing")
            if name not in self._dense_crc:
                raise CheckpointError(f"{self.path / MANIFEST}: no checksum for dense tensor {name!r}")
            if name in self.quantized:
                want = dense_layout(self.quantized[name], shape, self._dense_specs.get(name)).nbytes
                got = tuple(self._dense.get_slice(name).get_shape())
                if got != (want,):
                    raise CheckpointError(f"{self.path / DENSE}: packed tensor {name!r} has shape {got}, its "
                                          f"settings imply ({want},)")
                continue
            got = tuple(self._dense.get_slice(name).get_shape())
            if got != shape:
                raise CheckpointError(f"{self.path / DENSE}: tensor {name!r} has shape {got}, config implies {shape}")

    def names(self) -> list[str]:
        """Dense tensor names (HF); the experts are served by `expert_store`."""
        return list(self._expected)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._expected[name]

    def _read(self, name: str) -> torch.Tensor:
        """A dense tensor's stored bytes as a tensor, its crc32 verified on first read."""
        if name not in self._expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not a dense tensor of this store")
        t = self._dense.get_tensor(name)
        if name not in self._verified:
            crc = zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy())
            if crc != self._dense_crc[name]:
                raise CheckpointError(f"{self.path / DENSE}: tensor {name!r} fails its checksum (crc32 {crc:08x}, "
                                      f"manifest says {self._dense_crc[name]:08x}): the store is corrupt; "
                                      "re-run tools/quantize_experts.py")
            self._verified.add(name)
        return t

    def get(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """One dense tensor in dtype on device; a quantized one is dequantized (use `packed` to keep it packed)."""
        t = self._read(name)
        if name not in self.quantized:
            return t.to(device=device, dtype=dtype)
        return dequantized(self.quantized[name], t, self._expected[name], self._dense_specs.get(name), device, dtype)

    def packed(self, name: str) -> tuple[torch.Tensor, QuantSpec | None]:
        """A quantized dense tensor's packed bytes (CPU) and its int4 settings (None for int8)."""
        return self._read(name), self._dense_specs.get(name)

    def dense_device_bytes(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> int:
        """Device bytes of the dense weights once loaded on `device` (module function dense_device_bytes)."""
        kinds = {n: (k, self._dense_specs.get(n)) for n, k in self.quantized.items()}
        return dense_device_bytes(self.config, kinds, dtype, device, self.fused)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one packed expert: what crosses to the device per miss."""
        return self.layout.nbytes

    def expert_files(self) -> list[Path]:
        ex = self.manifest.get("experts")
        return [self.path / f for f in ex["shards"]] if ex else []

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

    def codec(self, device: torch.device | str, dtype: torch.dtype) -> FusedCodec | PrepackedCodec | HQQCodec:
        """The experts' codec: torch's fused int4 kernel (slots converted once at load, w1 and w3 stacked
        into one matrix; returns (w13, w2)) where it exists, else dequantization into scratch allocated
        once, right before the matmul (returns (w1, w2, w3)). `codec_note` says which, and why.
        A --prepack store holds the CPU kernel's layout: read as it is on the CPU, converted on CUDA."""
        kind = torch.device(device).type
        try:
            which, why = codec_kind(self.matrices, self.spec, self.cpu_layout, device, self.fused)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        if which == "prepacked":
            codec = PrepackedCodec(self.matrices, self.spec, device, STACK, self.cpu_layout)
            held = "read in place" if codec.in_place else f"converted per load into {codec.slot_layout.form}"
            self.codec_note = (f"fused int4 kernel on {kind}, experts stored in the {self.cpu_layout.name} CPU "
                               f"layout ({held})")
            return codec
        if which == "fused":
            self.codec_note = f"fused int4 kernel on {kind}"
            return FusedCodec(self.matrices, self.spec, device, stack=STACK)
        self.codec_note = f"dequantize-then-multiply ({why})"
        return HQQCodec(self.matrices, self.spec, device, dtype)

    def rows_codec(self, device: torch.device | str) -> FusedCodec | PrepackedCodec | None:
        """A codec converting the stored experts into the int4-rows layout the CUDA table kernels read
        (offload/rows.py), or None when these experts cannot be held in it (`rows_note` says why)."""
        why = rows_unavailable(self.matrices, self.spec, self.cpu_layout) if self.fused else "asked for"
        if why:
            self.rows_note = why
            return None
        if self.cpu_layout is not None:
            return PrepackedCodec(self.matrices, self.spec, device, STACK, self.cpu_layout, rows=True)
        return FusedCodec(self.matrices, self.spec, device, stack=STACK, rows=True)


def open_store(path: str | Path, fused: bool = True) -> QStore:
    return QStore(path, fused)


__all__ = ["FORMAT", "VERSION", "DenseSettings", "QStore", "open_store", "is_quantized_store", "read_manifest"]
