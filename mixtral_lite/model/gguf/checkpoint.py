"""A GGUF file as a checkpoint: dense tensors by Hugging Face name, experts for the offload engine.

`GGUFCheckpoint(path)` reads the header only and checks every tensor the config implies (name, shape,
type) before any weight is read. Then, like the quantized store (mixtral_lite/qstore.py):

    get(name, dtype, device)      any tensor by its HF name, dequantized (experts too: the reference path)
    install(model, device, dtype) the matrices into the model in the kernels' layouts (gguf/dense.py)
    expert_store("mmap" | "ram")  the experts' host home: the mapped file, read in place, or its bytes in RAM
    codec(device, dtype)          GGML blocks -> int4 kernel slots, converted per load (offload/ggml_codec.py)

Q and K rows: llama.cpp's converter reorders them for its RoPE (benchmarks/gguf_export.py, rope_permute);
they are put back in Hugging Face's order here, on the block rows, before anything else reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from offload.ggml import dequantize, row_bytes
from offload.ggml_codec import GGMLCodec, ggml_int4_unsupported, ggml_layout
from offload.store import Piece, RamStore

from ..checkpoint import expected_shapes, expert_name
from . import dense, prepacked
from .config import expert_tensors, hf_names, model_config
from .prepacked import SPEC
from .reader import GGUFError, GGUFFile

ROLES = ("w1", "w2", "w3")
ORDER = ("w1", "w3", "w2")  # w1 and w3 adjacent in a stored expert: they are read together
STACK = {"w13": ("w1", "w3")}


def hf_rows(raw: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K block rows [H * d, bytes] in llama.cpp's RoPE order -> Hugging Face's (inverse of rope_permute)."""
    rows = raw.shape[0]
    return raw.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(raw.shape)


class GGUFExperts:
    """The experts of a GGUF file as an offload store: each expert's matrices are regions of the mapped file."""

    pinned = False
    host_bytes = 0

    def __init__(self, file: GGUFFile, regions: list[list[list[tuple[int, int, int]]]], layout):
        self.file, self.regions, self.layout = file, regions, layout
        self.num_layers, self.num_experts = len(regions), len(regions[0])

    def pieces(self, layer: int, expert: int) -> list[Piece]:
        return [Piece(self.file.bytes[start : start + n], offset) for start, n, offset in self.regions[layer][expert]]

    def release(self, layer: int, expert: int) -> None:
        for start, n, _ in self.regions[layer][expert]:
            self.file.release(start, n)


class GGUFCheckpoint:
    """See the module docstring. fused=False: every matrix dequantized into the compute dtype. On the CPU
    the experts come from the file of their converted form beside the GGUF where it is current
    (gguf/prepacked.py), so the kernel reads them in place; `prepacked_note` says why not otherwise."""

    def __init__(self, path: str | Path, fused: bool = True, device: torch.device | str = "cpu"):
        self.path, self.fused, self.device = Path(path), fused, torch.device(device)
        self.spec = SPEC  # what the experts become: 4-bit codes in groups of 32
        self.file = GGUFFile(self.path)
        self.config = cfg = model_config(self.file)
        self._gguf = hf_names(self.file, cfg)
        self._expected = {n: s for n, s in expected_shapes(cfg).items() if ".experts." not in n}
        for name, shape in self._expected.items():
            info = self.file.info(self._gguf_name(name))
            if info.shape != shape:
                raise GGUFError(f"{self.path}: tensor {info.name!r} has shape {list(info.shape)}, the metadata "
                                f"implies {list(shape)}")
        self.quantized = {n: self.file.info(self._gguf_name(n)).type_name for n, s in self._expected.items()
                          if len(s) == 2 and ".gate." not in n}  # matrices: installed by gguf/dense.py
        self.prepacked, self.prepacked_note = None, "not a Mixtral"
        if cfg.is_moe:
            self._read_experts()
            self.prepacked_note = "experts go to a GPU: the GGUF's blocks cross the bus (fewer bytes)"
            if self.device.type == "cpu":
                path, found = prepacked.find(self)
                self.prepacked, self.prepacked_note = ((path, found), None) if path else (None, found)

    def _gguf_name(self, name: str) -> str:
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "token_embd.weight"
        try:
            return self._gguf[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor for {name!r} (the metadata implies one)") from None

    def _read_experts(self) -> None:
        """Per layer: each role's type and each expert's regions of the file, checked against the config."""
        cfg, f = self.config, self.file
        i, d = cfg.intermediate_size, cfg.hidden_size
        self.matrices = {"w1": (i, d), "w2": (d, i), "w3": (i, d)}
        self.types, where = [], []
        for layer in range(cfg.num_layers):
            tensors = expert_tensors(f, cfg, layer)
            types, per_role = {}, {}
            for role, (name, index) in tensors.items():
                names = [name] if index is not None else [name.format(e=e) for e in range(cfg.num_experts)]
                want = (cfg.num_experts, *self.matrices[role]) if index is not None else self.matrices[role]
                infos = [f.info(n) for n in names]
                for t in infos:
                    if t.shape != want or t.type_id != infos[0].type_id:
                        raise GGUFError(f"{self.path}: tensor {t.name!r} is {t.type_name} {list(t.shape)}, expected "
                                        f"{infos[0].type_name} {list(want)}")
                types[role] = infos[0].type
                n = self.matrices[role][0] * row_bytes(types[role], self.matrices[role][1])
                per_role[role] = ([(infos[0].offset + e * n, n) for e in range(cfg.num_experts)] if index is not None
                                  else [(t.offset, n) for t in infos])
            self.types.append(types)
            where.append(per_role)
        self.layout = ggml_layout(self.matrices, self.types, ORDER)
        offsets = {e.name: e.offset for e in self.layout.entries}
        self._regions = [[[(*where[layer][r][e], offsets[r]) for r in ORDER] for e in range(cfg.num_experts)]
                         for layer in range(cfg.num_layers)]

    # dense tensors, as Checkpoint and QStore serve them
    def names(self) -> list[str]:
        return list(self._expected)

    def shape(self, name: str) -> tuple[int, ...]:
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return self._expected["model.embed_tokens.weight"]
        return self._expected[name]

    def raw(self, name: str) -> tuple[torch.Tensor, object]:
        """A dense tensor's block rows (a view of the mapping; Q and K rows in HF order) and its GGML type."""
        g = self._gguf_name(name)
        raw = self.file.raw(g)
        heads = {"q_proj": self.config.num_heads, "k_proj": self.config.num_kv_heads}.get(name.split(".")[-2])
        if heads and ".self_attn." in name:
            raw = hf_rows(raw, heads)
        return raw.reshape(-1, raw.shape[-1]) if raw.dim() > 1 else raw.view(1, -1), self.file.info(g).type

    def get(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Any tensor by HF name (experts included), dequantized into dtype on device."""
        if ".experts." in name:
            return self._expert_matrix(name).to(device=device, dtype=dtype)
        if name not in self._expected:
            raise GGUFError(f"{self.path}: tensor {name!r} is not a dense tensor of this model")
        raw, t = self.raw(name)
        shape = self._expected[name]
        out = dequantize(t, raw.to(device), torch.empty(raw.shape[0], shape[-1], device=device))
        return out.view(shape).to(dtype)

    def _expert_matrix(self, name: str) -> torch.Tensor:
        parts = name.split(".")  # model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight
        layer, e, role = int(parts[2]), int(parts[5]), parts[6]
        if name != expert_name(layer, e, role) or layer >= self.config.num_layers or e >= self.config.num_experts:
            raise GGUFError(f"{self.path}: tensor {name!r} is not an expert matrix of this model")
        start, n, _ = self._regions[layer][e][ORDER.index(role)]
        rows, cols = self.matrices[role]
        return dequantize(self.types[layer][role], self.file.bytes[start : start + n].view(rows, -1),
                          torch.empty(rows, cols))

    def install(self, model, device, dtype) -> dict[str, str]:
        """Every matrix into `model` (int4 kernels or dequantized; see gguf/dense.py); returns {kind: how}."""
        return dense.install(model, self, torch.device(device), dtype)

    def dense_device_bytes(self, dtype: torch.dtype) -> int:
        return dense.device_bytes(self, dtype)

    # experts, as QStore serves them
    @property
    def expert_bytes(self) -> int:
        """Bytes of one stored expert: what crosses to the device per miss."""
        return self.prepacked[1].nbytes if self.prepacked else self.layout.nbytes

    def expert_store(self, kind: str = "mmap", pin: bool = False):
        """The experts' host home: "mmap" (the mapped file, read in place) or "ram" (its bytes loaded now)."""
        if kind not in ("mmap", "ram"):
            raise ValueError(f"unknown store {kind!r}: 'mmap' or 'ram'")
        src = prepacked.open_experts(self, *self.prepacked, "cpu")[0] if self.prepacked else self.ggml_experts()
        return src if kind == "mmap" else RamStore(src, pin=pin)

    @property
    def resident_hint(self) -> str:
        """How to run it when its experts, converted at load, would not fit in RAM (runtime/offloading.py)."""
        return (f"convert them once into a file beside it, read in place from then on: python tools/gguf_prepack.py "
                f"{self.path}")

    def ggml_experts(self) -> GGUFExperts:
        """The experts as the GGUF holds them, read in place."""
        return GGUFExperts(self.file, self._regions, self.layout)

    def codec(self, device: torch.device | str, dtype: torch.dtype):
        """GGML blocks -> torch's int4 kernel, each expert converted as it is loaded into a slot; or, with
        the converted-experts file, that file's kernel layout, read in place."""
        kind = torch.device(device).type
        if self.prepacked and self.fused:
            path, layout = self.prepacked
            codec = prepacked.open_experts(self, path, layout, device)[1]
            held = "read in place" if codec.in_place else f"converted per load into {codec.slot_layout.form}"
            self.codec_note = f"fused int4 kernel on {kind}, experts converted once into {path.name} ({held})"
            return codec
        return self.ggml_codec(device)

    def rows_codec(self, device: torch.device | str) -> GGMLCodec | None:
        """The experts converted from the file's blocks into the int4-rows layout of the CUDA table kernels
        (offload/rows.py), or None (`rows_note` says why)."""
        if not self.fused:
            self.rows_note = "asked for"
            return None
        return GGMLCodec(self.matrices, self.types, device, STACK, ORDER, rows=True)

    def ggml_codec(self, device: torch.device | str) -> GGMLCodec:
        """The codec of the experts as the GGUF holds them: converted into int4 kernel slots per load."""
        kind = torch.device(device).type
        if not self.fused:
            raise GGUFError(f"{self.path}: GGUF experts run on the int4 kernels only (no dequantizing path)")
        why = ggml_int4_unsupported(self.matrices, device)
        if why:
            raise GGUFError(f"{self.path}: the experts need torch's int4 kernel, unavailable on {kind} here: {why}")
        codec = GGMLCodec(self.matrices, self.types, device, STACK, ORDER)
        types = sorted({t.name for layer in self.types for t in layer.values()})
        self.codec_note = f"fused int4 kernel on {kind}, converted from {'/'.join(types)} at each load" + (
            f" ({'/'.join(codec.requantized)} re-quantized to 4 bits)" if codec.requantized else "")
        return codec
