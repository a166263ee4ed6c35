"""A GGUF's experts converted once into this CPU's int4 kernel layout, in a file beside it, read in place.

On the CPU a GGML block is not what torch's int4 kernel reads: every load of an expert converts it
(offload/ggml_codec.py; a full-size Q4_0 expert of Mixtral-8x7B costs ~1 s on two cores, against ~5 ms
to copy it). Converting every expert once at load needs their converted size in RAM (28 GiB for
Mixtral-8x7B), more than the machines the mmap path serves. So the conversion can be written once to

    FILE.gguf.int4-cpu-<layout>.safetensors     one uint8 tensor per expert, "layers.{l}.experts.{e}",
                                                in a --prepack store's layout (offload/prepacked.py),
                                                group 32; metadata: the source's size and mtime, the
                                                layout, a format version

and later CPU runs read it as they read a --prepack store: in place through the mapping, a miss being a
plain copy. It is used only where it is current (same source size and mtime, same layout); it is
written to FILE....partial and renamed, so an interrupted write leaves nothing that would be read.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

from offload.kernels import CPU_LAYOUTS, native_cpu_layout
from offload.packing import Layout, views
from offload.prepacked import PrepackedCodec
from offload.quant import QuantSpec
from offload.store import SafetensorsSource, StoreError, read_header

from .reader import GGUFError

FORMAT, VERSION = "mixtral-lite-gguf-experts", 1
SPEC = QuantSpec(4, 32)  # GGML forms convert to 4-bit codes in groups of 32


def expert_tensor(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def sidecar_path(gguf: Path, form: str) -> Path:
    return gguf.with_name(f"{gguf.name}.{form}.safetensors")


def _identity(gguf: Path) -> dict[str, str]:
    st = gguf.stat()
    return {"source": gguf.name, "source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns)}


def native_form() -> str | None:
    lay = native_cpu_layout()
    return f"int4-cpu-{lay.name}" if lay else None


def find(ckpt) -> tuple[Path, Layout] | tuple[None, str]:
    """(the current converted-experts file, its layout), or (None, why there is none to read)."""
    form = native_form()
    if form is None:
        return None, "this CPU's int4 layout is none mixtral-lite writes"
    path = sidecar_path(ckpt.path, form)
    if not path.is_file():
        return None, f"no {path.name} beside it"
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(n)).get("__metadata__", {})
    except (OSError, ValueError, struct.error) as e:
        return None, f"{path.name} is unreadable ({e})"
    want = {"format": FORMAT, "version": str(VERSION), "form": form, **_identity(ckpt.path)}
    stale = [k for k, v in want.items() if meta.get(k) != v]
    if stale:
        return None, f"{path.name} does not match it ({', '.join(stale)} differ): write it again"
    return path, Layout.from_json(meta["layout"])


def open_experts(ckpt, path: Path, layout: Layout, device: torch.device | str):
    """(host store over the file, codec) for a converted-experts file `find` returned."""
    cfg = ckpt.config
    try:
        src = SafetensorsSource([path], cfg.num_layers, cfg.num_experts, lambda layer, e: {"packed": expert_tensor(
            layer, e)}, layout=layout)
    except StoreError as e:
        raise GGUFError(f"{path}: {e}") from None
    codec = PrepackedCodec(ckpt.matrices, SPEC, device, {"w13": ("w1", "w3")},
                           stored=CPU_LAYOUTS[layout.form.removeprefix("int4-cpu-")])
    if codec.layout != layout:
        raise GGUFError(f"{path}: its expert layout is not the one {ckpt.path.name}'s shapes give: write it again")
    return src, codec


def write(ckpt, progress: bool = True) -> Path:
    """Convert every expert of the GGUF into this CPU's kernel layout; returns the file written."""
    form = native_form()
    if form is None:
        raise GGUFError(f"{ckpt.path}: this CPU's int4 layout is none mixtral-lite writes; run without the file")
    cfg, codec = ckpt.config, ckpt.ggml_codec("cpu")
    layout, src = codec.slot_layout, ckpt.ggml_experts()
    out = sidecar_path(ckpt.path, form)
    tmp = out.with_name(out.name + ".partial")
    names = [expert_tensor(layer, e) for layer in range(cfg.num_layers) for e in range(cfg.num_experts)]
    header = {"__metadata__": {"format": FORMAT, "version": str(VERSION), "form": form,
                               "layout": layout.to_json(), **_identity(ckpt.path)}}
    for i, name in enumerate(names):
        header[name] = {"dtype": "U8", "shape": [layout.nbytes], "data_offsets": [i * layout.nbytes,
                                                                                  (i + 1) * layout.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # data 64-byte aligned: the kernel's views of it are aligned
    buf = torch.empty(layout.nbytes, dtype=torch.uint8)
    slot, t0 = views(buf, layout), time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for i in range(len(names)):
                layer, e = divmod(i, cfg.num_experts)
                codec.for_layer(layer).fill(src.pieces(layer, e), slot)
                src.release(layer, e)
                f.write(buf.numpy())
                if progress:
                    _report(i + 1, len(names), time.perf_counter() - t0, out.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if read_header(out)[names[-1]].nbytes != layout.nbytes:
        raise GGUFError(f"{out}: written, but its header does not read back")
    return out


def _report(done: int, total: int, seconds: float, name: str) -> None:
    eta = seconds / done * (total - done)
    end = "\n" if done == total else ""
    print(f"\rconverting experts into {name}: {done}/{total} ({seconds:.0f} s, {eta:.0f} s left)   ", end=end,
          file=sys.stderr, flush=True)
