"""Figures every run reports: timing, memory, and whatever the expert provider counts."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import psutil
import torch

try:
    import resource
except ImportError:  # native Windows: no getrusage; psutil's peak working set instead
    resource = None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux; Windows: peak working set)."""
    info = psutil.Process().memory_info()
    if resource is None:
        return max(getattr(info, "peak_wset", 0), info.rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    return max(peak, info.rss)


def disk_read_bytes() -> int | None:
    """Bytes this process has made the kernel read from storage (page-cache misses of a mapped store
    included; reads the page cache served are not); None where the platform does not count them."""
    try:
        return psutil.Process().io_counters().read_bytes
    except (AttributeError, psutil.Error, OSError):
        return None


def device_bytes(model, cache_bytes: int, device: torch.device) -> int:
    """Peak bytes on the device: CUDA's allocator peak, else what we placed there ourselves."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    seen, total = set(), 0
    for p in (*model.parameters(), *model.buffers()):  # buffers: weights held in fused-kernel layouts
        if p.numel() and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total + cache_bytes + expert_device_bytes(model)


def cuda_memory(device: torch.device) -> dict:
    """Beside the allocator's peak, which understates nvidia-smi by 0.4-1 GiB: what torch holds in its
    cache (reserved) and what the whole device has in use (context and other processes included)."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"device_reserved_bytes": torch.cuda.memory_reserved(device),
            "device_peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "device_used_bytes": total - free, "device_total_bytes": total}


def expert_device_bytes(model) -> int:
    experts = model.experts
    return 0 if experts is None else int(experts.stats().get("device_expert_bytes", 0))


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """obj as JSON, written under a temporary name then renamed; NaN/Inf refuse (they are not JSON)."""
    path = Path(path)
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_stats(stats: dict) -> str:
    """One human line per figure for stderr, each labelled so it reads one way."""
    mib = 1024 * 1024
    on_cuda = str(stats.get("device", "")).startswith("cuda")
    device = (f"CUDA peak allocated {stats['peak_device_bytes'] / mib:.1f} MiB, peak reserved "
              f"{stats.get('device_peak_reserved_bytes', 0) / mib:.1f} MiB, device in use "
              f"{stats.get('device_used_bytes', 0) / mib:.0f} of {stats.get('device_total_bytes', 0) / mib:.0f} MiB"
              if on_cuda else
              f"weights + KV cache + expert slots {stats['peak_device_bytes'] / mib:.1f} MiB")
    lines = [
        f"load: {stats['load_s']:.2f} s",
        f"prompt eval: {stats['prompt_tokens']} tokens in {stats['ttft_s'] * 1000:.1f} ms "
        f"({stats.get('prompt_tokens_per_s', 0.0):.1f} tokens/s; time to first token)",
        f"decode: {stats['generated_tokens']} tokens at {stats['decode_tokens_per_s']:.2f} tokens/s",
        f"memory: peak RSS {stats['peak_rss_bytes'] / mib:.0f} MiB   {device}",
    ]
    if stats.get("disk_read_bytes") is not None:
        tokens = stats["prompt_tokens"] + stats["generated_tokens"]
        lines.append(f"disk: {stats['disk_read_bytes'] / mib:.1f} MiB read from storage while generating "
                     f"({stats['disk_read_bytes'] / max(tokens, 1) / mib:.2f} MiB per token, prompt tokens included; "
                     "what the page cache served is not counted)")
    if "hit_rate" in stats:
        lines += _expert_lines(stats)
    return "\n".join(lines)


def _expert_lines(stats: dict) -> list[str]:
    """The experts' figures (offload/stats.py says what each counts): hits are uses served from a slot with no
    transfer for them this token; a prefetch has its own line; the bus bytes per token by whom they were for."""
    mib = 1024 * 1024
    used = stats.get("prefetch_used", 0)
    pool = stats.get("expert_pool")
    where = "" if pool is None else f"; {stats.get('pool_slots')} slots, " + (
        "one pool for every layer" if pool == "global" else "per layer")
    lines = [f"experts: hit rate {stats['hit_rate'] or 0:.3f} ({stats['expert_hits']} of "
             f"{stats.get('expert_uses', stats['expert_hits'] + stats['expert_misses'])} uses served from a slot "
             f"with no transfer this token; {used} by a prefetch, {stats['expert_misses']} misses; over prompt and "
             f"generated tokens{where})"]
    if stats.get("miss_policy") == "read":
        lines.append(f"misses: read in place from pinned RAM by the GPU's kernels, "
                     f"{stats['bytes_read_in_place'] / mib:.1f} MiB; {stats['expert_copies']} admitted into slots "
                     f"one step later, {stats['bytes_copied'] / mib:.1f} MiB copied")
    if stats.get("cpu_expert_runs"):
        lines.append(f"misses: {stats['expert_copies']} copied, {stats['cpu_expert_runs']} run on the CPU "
                     f"({stats['cpu_expert_s']:.3f} s), {stats['copies_avoided_bytes'] / mib:.1f} MiB of copies "
                     f"avoided ({stats.get('miss_policy')})")
    recall = stats.get("prefetch_recall")  # None when prefetch is off (no guesses to score)
    if recall is None:
        lines.append("prefetch: off")
    else:
        lines.append(f"prefetch: {stats.get('prefetch_issued', 0)} issued, {used} used, "
                     f"{stats.get('prefetch_wasted', 0)} wasted, {stats.get('prefetch_refused', 0)} refused (would "
                     f"have evicted an expert used more often); recall {recall:.3f} (share of the chosen experts "
                     "that the guess named)")
    per_token = (stats["bytes_per_token"] or 0) / mib
    lines.append(
        f"transfers: {stats['bytes_host_to_device'] / mib:.1f} MiB host->device, {per_token:.2f} MiB per token "
        f"(prompt tokens included)   stall {stats['stall_s']:.3f} s   "
        f"expert slots {stats['device_expert_bytes'] / mib:.1f} MiB")
    kinds = (("demand_miss", "demand misses"), ("prefetch_used", "prefetch used"),
             ("prefetch_wasted", "prefetch wasted"), ("read_in_place", "read in place"), ("admitted", "admissions"))
    parts = [f"{label} {(stats.get(f'{kind}_bytes_per_token') or 0) / mib:.2f}" for kind, label in kinds
             if f"{kind}_bytes_per_token" in stats]
    if parts:
        lines.append("bus per token (MiB): " + ", ".join(parts))
    return lines
