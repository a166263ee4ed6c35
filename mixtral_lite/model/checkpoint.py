"""Read a Hugging Face checkpoint lazily: one model.safetensors or index-listed shards.

Tensors are opened with safetensors' safe_open (memory-mapped) and read one at a time,
so the checkpoint is never held twice in memory. Every problem names the file and tensor.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names file and tensor."""


def expert_name(layer: int, expert: int, w: str) -> str:
    """HF name of one expert matrix; w is "w1", "w2" or "w3"."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint for `cfg` must hold, with its shape."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q)}
        if cfg.is_moe:
            shapes[p + "block_sparse_moe.gate.weight"] = (cfg.num_experts, d)
            for e in range(cfg.num_experts):
                shapes |= {expert_name(i, e, "w1"): (cfg.intermediate_size, d),
                           expert_name(i, e, "w3"): (cfg.intermediate_size, d),
                           expert_name(i, e, "w2"): (d, cfg.intermediate_size)}
        else:
            i_, m = cfg.intermediate_size, p + "mlp."
            shapes |= {m + "gate_proj.weight": (i_, d), m + "up_proj.weight": (i_, d),
                       m + "down_proj.weight": (d, i_)}
    return shapes


def shard_map(path: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX}: not a safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / INDEX}: 'weight_map' must map tensor names to shard files")
        return {name: path / shard for name, shard in weight_map.items()}
    if (path / SINGLE).exists():
        return {name: path / SINGLE for name in _open(path / SINGLE).keys()}
    if (path / "dense.safetensors").is_file() or any(path.glob("experts-*-of-*.safetensors*")):
        raise CheckpointError(f"{path}: a quantized store without its manifest.json (an interrupted "
                              "tools/quantize_experts.py run? rerun it with --resume to finish the store)")
    raise CheckpointError(f"{path}: neither {SINGLE} nor {INDEX} found")


def _open(file: Path):
    if file.is_dir():
        raise CheckpointError(f"{file}: is a directory, not a safetensors file")
    if not file.is_file():
        raise CheckpointError(f"{file}: shard is missing")
    if not os.access(file, os.R_OK):
        raise CheckpointError(f"{file}: permission denied (the shard is not readable)")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{file}: not a readable safetensors file ({header_problem(file) or _first_line(e)})") \
            from None


# bytes per element of each safetensors dtype tag (the 4- and 6-bit floats pack below a byte: not sized here)
ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
               "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8,
               "F64": 8, "I64": 8, "U64": 8, "F4": 0, "F6_E2M3": 0, "F6_E3M2": 0}


def header_problem(file: Path) -> str | None:
    """What is wrong in a safetensors file's header, naming the tensor (None: nothing this check finds).
    safetensors' own messages often name no tensor ("invalid shape, data type, or offset for tensor")."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"too short to be a safetensors file ({size} bytes)"
            n = int.from_bytes(raw, "little")
            if n > size - 8:
                return f"header length {n} does not fit the file ({size} bytes); truncated?"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"unreadable header ({_first_line(e)})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    data = size - 8 - n
    for name, meta in header.items():
        if name != "__metadata__":
            why = _entry_problem(meta, data)
            if why:
                return f"tensor {name!r}: {why}"
    return None


def _entry_problem(meta, data: int) -> str | None:
    if not isinstance(meta, dict):
        return "its header entry is not an object"
    tag, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if tag not in ST_ITEMSIZE:
        return f"unknown dtype {tag!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets):
        return f"data_offsets {offsets!r} is not [begin, end]"
    begin, end = offsets
    if not 0 <= begin <= end <= data:
        return f"data_offsets [{begin}, {end}] fall outside the file's {data} bytes of data"
    need = math.prod(shape) * ST_ITEMSIZE[tag]
    if ST_ITEMSIZE[tag] and end - begin != need:
        return f"shape {shape} in {tag} takes {need} bytes, its data_offsets span {end - begin}"
    return None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_finite(t: torch.Tensor, file: Path | str, name: str, cast: str = "") -> None:
    """Raise CheckpointError naming file and tensor if `t` holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{file}: tensor {name!r} holds {bad} NaN/Inf values{cast}")


class Checkpoint:
    """Lazy, validated access to a checkpoint's tensors by HF name."""

    def __init__(self, path: str | Path, config: ModelConfig | None = None):
        self.path = Path(path)
        self.config = config or ModelConfig.from_dir(self.path)
        self._where = shard_map(self.path)
        self._files: dict[Path, object] = {}
        self._expected = expected_shapes(self.config)
        self._validate()

    def _handle(self, file: Path):
        if file not in self._files:
            self._files[file] = _open(file)
        return self._files[file]

    def _validate(self) -> None:
        missing = sorted(set(self._expected) - set(self._where))
        if missing:
            raise CheckpointError(f"{self.path}: tensor {missing[0]!r} is missing"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(n for n in set(self._where) - set(self._expected)
                       if not (self.config.tie_word_embeddings and n == "lm_head.weight"))
        if extra:
            raise CheckpointError(f"{self._where[extra[0]]}: unexpected tensor {extra[0]!r} for this config")
        for name, shape in self._expected.items():
            file = self._where[name]
            handle = self._handle(file)
            if name not in handle.keys():
                raise CheckpointError(f"{file}: tensor {name!r} listed in the index is not in the shard")
            got = tuple(handle.get_slice(name).get_shape())
            if got != shape:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {got}, config implies {shape}")

    def names(self) -> list[str]:
        return list(self._expected)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._expected[name]

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Read one tensor, cast to dtype, on device."""
        file = self._where.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this checkpoint")
        try:
            t = self._handle(file).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({_first_line(e)})") from None
        out = t.to(device=device, dtype=dtype)
        if not bool(torch.isfinite(out).all()):  # NaN/Inf weights would turn every output into garbage
            overflow = bool(torch.isfinite(t).all())
            check_finite(out, file, name, f" after the cast to {str(dtype).removeprefix('torch.')} (values "
                         "too large for it: choose another --dtype)" if overflow else "")
        return out
