"""runtime/sizing.py's Sizes for a GGUF file: from its header alone (model/gguf), decided as the loader decides.

    experts on CUDA, table kernels usable    int4-rows slots, pinned host copies of the same ("rows")
    on the CPU with a current converted file  that file's kernel layout, read in place ("prepacked")
    otherwise                                 the file's blocks at home, int4 kernel slots of group 32,
                                              converted at every load ("ggml")
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from offload import triton_moe
from offload.fused import kernel_layout
from offload.ggml import GROUP
from offload.rows import scratch_bytes as rows_scratch_bytes

from ..model.gguf.checkpoint import GGUFCheckpoint
from .flags import READ
from .offloading import scratch_bytes
from .plan import LoadPlan


def gguf_sizes(plan: LoadPlan, probe: torch.device, note: str) -> dict:
    """The fields of sizing.Sizes for a GGUF run (see the module docstring); probe: the device whose kernels
    decide the codec."""
    ckpt = GGUFCheckpoint(plan.model_dir, device=plan.device)
    cfg, device, dtype = plan.config, plan.device, plan.dtype
    dense = ckpt.dense_device_bytes(dtype)
    if not cfg.is_moe:
        return {"source": "gguf", "dense": dense, "note": note}
    why = _table_unavailable(plan)
    if why is None:
        rows = ckpt.rows_codec("cpu")  # the rows layout is every device's
        slot = rows.slot_layout.nbytes
        return {"source": "gguf", "dense": dense, "slot": slot, "host": slot, "codec": "rows", "note": note,
                "scratch": rows_scratch_bytes(rows.out_shapes) + slot + ckpt.layout.nbytes}
    if ckpt.prepacked:
        codec = ckpt.codec(probe, dtype)
        slot = kernel_layout(codec.names, codec.out_shapes, GROUP, device)
        scratch = 0 if slot == codec.layout else max(n * k for n, k in codec.out_shapes.values())
        home = codec.layout
        note = "; ".join(filter(None, [note, f"experts read in place from {ckpt.prepacked[0].name} (converted once)"]))
    else:
        codec = ckpt.ggml_codec(probe)
        slot, scratch, home = kernel_layout(codec.names, codec.out_shapes, GROUP, device), codec.scratch_bytes(), \
            codec.layout
        note = "; ".join(filter(None, [note, f"experts converted from the GGUF's blocks at each load "
                                             f"({ckpt.prepacked_note})"]))
    stand_in = SimpleNamespace(scratch_bytes=lambda: scratch, slot_layout=slot, layout=home)
    scratch = scratch_bytes(stand_in, SimpleNamespace(layout=home), device)
    return {"source": "gguf", "dense": dense, "slot": slot.nbytes, "host": home.nbytes, "scratch": scratch,
            "codec": "prepacked" if ckpt.prepacked else "ggml", "note": note}


def _table_unavailable(plan: LoadPlan) -> str | None:
    """Why the CUDA table engine will not serve a GGUF's experts (as runtime/offloading.table_engine decides)."""
    e, cfg = plan.experts, plan.config
    if plan.device.type != "cuda" or e.miss_policy not in (None, READ):
        return "not on CUDA, or another --miss-policy"
    why = triton_moe.self_check(plan.device) if torch.cuda.is_available() else None
    why = why or triton_moe.shape_unsupported(cfg.hidden_size, cfg.intermediate_size, GROUP)
    if why is None and e.store == "mmap":
        why = "--store mmap: the kernels read missed experts from pinned RAM (the converted copies)"
    if why and e.miss_policy == READ:
        raise SystemExit(f"error: --miss-policy read: {why}")
    return why
