"""Figures every run reports: timing, memory, and whatever the expert provider counts."""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import psutil
import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    return max(peak, psutil.Process().memory_info().rss)


def device_bytes(model, cache_bytes: int, device: torch.device) -> int:
    """Peak bytes on the device: CUDA's allocator peak, else what we placed there ourselves."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total + cache_bytes + expert_device_bytes(model)


def expert_device_bytes(model) -> int:
    experts = model.experts
    return 0 if experts is None else int(experts.stats().get("device_expert_bytes", 0))


def write_json_atomic(path: str | Path, obj: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def format_stats(stats: dict) -> str:
    """One human line per figure for stderr."""
    mib = 1024 * 1024
    lines = [
        f"load: {stats['load_s']:.2f} s   prompt: {stats['prompt_tokens']} tokens   "
        f"time to first token: {stats['ttft_s'] * 1000:.1f} ms",
        f"decode: {stats['generated_tokens']} tokens at {stats['decode_tokens_per_s']:.2f} tokens/s",
        f"memory: peak RSS {stats['peak_rss_bytes'] / mib:.0f} MiB   "
        f"peak device {stats['peak_device_bytes'] / mib:.1f} MiB",
    ]
    if "hit_rate" in stats:
        recall = stats.get("prefetch_recall")  # None when prefetch is off (no guesses to score)
        lines.append(
            f"experts: hit rate {stats['hit_rate'] or 0:.3f} ({stats['expert_hits']} hits, "
            f"{stats['expert_misses']} misses)   prefetch recall {'-' if recall is None else f'{recall:.3f}'} "
            f"({stats.get('prefetch_used', 0)}/{stats.get('prefetch_issued', 0)} used)")
        lines.append(
            f"transfers: {stats['bytes_host_to_device'] / mib:.1f} MiB host->device, "
            f"{(stats['bytes_per_token'] or 0) / mib:.2f} MiB/token   stall {stats['stall_s']:.3f} s   "
            f"expert pool {stats['device_expert_bytes'] / mib:.1f} MiB")
    return "\n".join(lines)
