"""`generate --dry-run`: what a LoadPlan would allocate, from config.json and the flags alone.

No weight is read, so a user can size a run (and choose -c, K, --store) before downloading a
checkpoint: a folder holding only the model's config.json is enough (plus manifest.json for a
quantized store); of a GGUF file only the header (metadata, tensor table) is read. The figures are
the ones the loader allocates: dense weights and expert slots in the compute dtype, the KV cache of
the window, an upper estimate of activations, and the experts' host home (RAM, pinned on CUDA, or a
memory-mapped file the page cache holds).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model.config import DTYPES, ModelConfig
from ..model.gguf import is_gguf
from ..model.gguf.checkpoint import GGUFCheckpoint
from .budget import GIB, choose_slots, dense_bytes, runtime_bytes
from .plan import LoadPlan

MIB = 1 << 20


def expert_bytes(cfg: ModelConfig, model_dir: Path, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(bytes of one expert in a device slot, bytes of one expert in its host home)."""
    manifest = model_dir / "manifest.json"
    if manifest.is_file():  # quantized store: packed bytes both places
        n = int(json.loads(manifest.read_text()).get("experts", {}).get("nbytes", 0))
        return n, n
    weights = 3 * cfg.intermediate_size * cfg.hidden_size
    file_dtype = DTYPES[cfg.dtype]
    slot_dtype = dtype if device.type == "cpu" else file_dtype  # CPU slots hold the compute dtype
    return weights * slot_dtype.itemsize, weights * file_dtype.itemsize


def gguf_expert_bytes(ckpt, device: torch.device) -> tuple[int, int, bool]:
    """A GGUF's (slot bytes, host bytes, read in place): int4 kernel slots of group 32 converted from the file's
    blocks, or on the CPU its converted-experts file where current (model/gguf/prepacked.py), read in place."""
    if ckpt.prepacked:
        return ckpt.expert_bytes, ckpt.expert_bytes, True
    return ckpt.ggml_codec(device).slot_layout.nbytes, ckpt.expert_bytes, False


def figures(plan: LoadPlan) -> dict:
    """The figures --dry-run prints; K as the run would choose it."""
    cfg, model_dir, device, dtype = plan.config, plan.model_dir, plan.device, plan.dtype
    window, e = plan.window, plan.experts
    kv, act = runtime_bytes(cfg, dtype, window, plan.chunk)
    gguf = GGUFCheckpoint(model_dir, device=device) if is_gguf(model_dir) else None  # its header only
    out = {"model": str(model_dir), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
           "window": window, "dense_bytes": dense_bytes(cfg, dtype, gguf), "kv_cache_bytes": kv,
           "activation_bytes": act}
    if cfg.is_moe and gguf is not None:
        return _with_gguf_experts(out, plan, gguf)
    if cfg.is_moe:
        slot, host = expert_bytes(cfg, model_dir, dtype, device)
        k = e.per_layer
        if e.device_memory is not None:
            k = choose_slots(cfg, dtype, slot, window=window, chunk=plan.chunk, device=device, scratch=0,
                             gib=e.device_memory, dense=dense_bytes(cfg, dtype)).k
        k = k or cfg.num_experts
        offloaded = k < cfg.num_experts or e.store is not None or (model_dir / "manifest.json").is_file()
        store = (e.store or "ram") if offloaded else "resident"
        all_host = cfg.num_layers * cfg.num_experts * host
        out |= {"experts_per_layer": k, "num_experts": cfg.num_experts, "store": store,
                "expert_slot_bytes": slot, "device_expert_bytes": cfg.num_layers * k * slot,
                "host_expert_bytes": all_host if store == "ram" else 0,
                "pinned_bytes": all_host if store == "ram" and device.type == "cuda" else 0,
                "mmapped_bytes": all_host if store == "mmap" else 0}
    return _totals(out, device)


def _with_gguf_experts(out: dict, plan: LoadPlan, gguf) -> dict:
    """The experts of a GGUF as the run places them: every one cached on the CPU (read through the mapping,
    converted into RAM unless the converted-experts file is read in place), else K slots and a host store."""
    cfg, e, device = plan.config, plan.experts, plan.device
    slot, host, in_place = gguf_expert_bytes(gguf, device)
    k = e.per_layer
    if e.device_memory is not None:
        k = choose_slots(cfg, plan.dtype, slot, window=plan.window, chunk=plan.chunk, device=device, scratch=0,
                         gib=e.device_memory, dense=out["dense_bytes"]).k
    k = k or cfg.num_experts
    all_host = cfg.num_layers * cfg.num_experts * host
    resident = device.type == "cpu" and k == cfg.num_experts and e.store is None
    store = "mmap" if resident else e.store or "ram"
    out |= {"experts_per_layer": k, "num_experts": cfg.num_experts, "store": store, "expert_slot_bytes": slot,
            "device_expert_bytes": 0 if resident and in_place else cfg.num_layers * k * slot,
            "host_expert_bytes": all_host if store == "ram" else 0,
            "pinned_bytes": all_host if store == "ram" and device.type == "cuda" else 0,
            "mmapped_bytes": all_host if store == "mmap" else 0,
            "experts_note": gguf.prepacked_note or "converted-experts file read in place"}
    return _totals(out, device)


def _totals(out: dict, device: torch.device) -> dict:
    kv, act = out["kv_cache_bytes"], out["activation_bytes"]
    device_total = out["dense_bytes"] + kv + act + out.get("device_expert_bytes", 0)
    out["device_total_bytes"] = device_total
    out["host_ram_bytes"] = out.get("host_expert_bytes", 0) + (device_total if device.type == "cpu" else 0)
    return out


def format_figures(plan: dict) -> str:
    """figures() as the table --dry-run prints."""
    def gib(key: str) -> str:
        return f"{plan[key] / GIB:.2f} GiB" if plan[key] >= GIB else f"{plan[key] / MIB:.1f} MiB"

    where = "CUDA device" if plan["device"].startswith("cuda") else "CPU (the device is RAM)"
    lines = [f"plan for {plan['model']} on {where}, {plan['dtype']}, KV window {plan['window']} tokens",
             f"  dense weights        {gib('dense_bytes')}",
             f"  KV cache             {gib('kv_cache_bytes')}",
             f"  activations (max)    {gib('activation_bytes')}"]
    if "experts_per_layer" in plan:
        lines += [f"  expert slots         {gib('device_expert_bytes')} ({plan['experts_per_layer']} of "
                  f"{plan['num_experts']} per layer, {plan['expert_slot_bytes'] / MIB:.1f} MiB each; "
                  f"store: {plan['store']})",
                  f"  host expert store    {gib('host_expert_bytes')} (pinned {gib('pinned_bytes')}, "
                  f"memory-mapped {gib('mmapped_bytes')})"]
        if plan.get("experts_note"):
            lines.append(f"  experts              {plan['experts_note']}")
    lines += [f"  device total         {gib('device_total_bytes')}",
              f"  host RAM (at least)  {gib('host_ram_bytes')}"]
    return "\n".join(lines)
