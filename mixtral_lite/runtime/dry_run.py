"""`generate --dry-run`: a plan's figures, from config.json and the flags alone; the same figures a run keeps.

No weight is read, so a user can size a run (and choose -c, K, --store) before downloading a
checkpoint: a folder holding only the model's config.json is enough (plus manifest.json for a
quantized store; `--bits N` plans the store tools/quantize_experts.py would make from it). The
sizes and the placement come from the run's own planner (runtime/sizing.py): dense weights and
expert slots as the loader holds them, codec scratch, the KV cache of the window, an upper estimate
of activations, on CUDA the context, workspaces and margin, and the experts' host home (RAM, pinned
on CUDA, or a memory-mapped file the page cache holds). `--cards` adds the plan per card size.
"""

from __future__ import annotations

from .budget import CUBLAS_WORKSPACE, CUDA_CONTEXT, GIB, MARGIN_MIN, plan_slots, runtime_bytes
from .plan import LoadPlan
from .sizing import Placement, Sizes

MIB = 1 << 20
CARDS = (8.0, 12.0, 16.0, 24.0)  # --cards without a list: common consumer card sizes, GiB


def figures(plan: LoadPlan, sz: Sizes, placement: Placement) -> dict:
    """The figures --dry-run prints (and a run keeps as model.plan_figures)."""
    cfg, device, dtype = plan.config, plan.device, plan.dtype
    kv, act = runtime_bytes(cfg, dtype, plan.window, plan.chunk)
    overhead = 0
    if device.type == "cuda":
        overhead = placement.budget.overhead if placement.budget else CUDA_CONTEXT + CUBLAS_WORKSPACE + MARGIN_MIN
    out = {"model": str(plan.model_dir), "device": device.type, "dtype": str(dtype).removeprefix("torch."),
           "window": plan.window, "source": sz.source, "dense_bytes": sz.dense, "kv_cache_bytes": kv,
           "activation_bytes": act, "overhead_bytes": overhead}
    expert_bytes, host = 0, 0
    if cfg.is_moe:
        resident = placement.experts == "resident"  # stacked per layer in the compute dtype
        slot = 3 * cfg.intermediate_size * cfg.hidden_size * dtype.itemsize if resident else sz.slot
        k, all_host = placement.k, cfg.num_layers * cfg.num_experts * sz.host
        n = placement.device_slots(cfg.num_layers)  # every slot: K x layers, or the global pool's N
        expert_bytes = None if n is None else n * slot
        ram = placement.experts in ("offloaded", "table") and placement.store == "ram"
        host = all_host if ram else 0
        pooled = placement.experts in ("offloaded", "table")
        out |= {"experts": placement.experts, "experts_per_layer": k, "num_experts": cfg.num_experts,
                "expert_pool": placement.pool if pooled else None, "pool_slots": n,
                "store": placement.store, "codec": sz.codec, "expert_slot_bytes": slot,
                "expert_host_bytes": sz.host, "scratch_bytes": 0 if resident else sz.scratch,
                "device_expert_bytes": expert_bytes, "host_expert_bytes": host,
                "pinned_bytes": host if device.type == "cuda" else 0,
                "mmapped_bytes": all_host if placement.store == "mmap" else 0}
    device_total = sz.dense + kv + act + overhead + out.get("scratch_bytes", 0) + (expert_bytes or 0)
    out["device_total_bytes"] = device_total
    out["host_ram_bytes"] = host + (device_total if device.type == "cpu" else 0)
    if sz.note:
        out["note"] = sz.note
    return out


def cards(plan: LoadPlan, sz: Sizes, sizes_gib: tuple[float, ...]) -> list[dict]:
    """Per card size (GiB, as --device-memory takes it): K as the planner would choose it, and the device total."""
    cfg, rows = plan.config, []
    for gib in sizes_gib:
        dp = plan_slots(cfg, plan.dtype, int(gib * GIB), max(sz.slot, 1), window=plan.window, chunk=plan.chunk,
                        device=plan.device, scratch=sz.scratch, dense=sz.dense, pool=plan.experts.expert_pool)
        top = cfg.experts_per_tok * cfg.num_layers * sz.slot
        fits = dp.k >= cfg.experts_per_tok if cfg.is_moe else dp.fixed() <= dp.budget
        rows.append({"card_gib": gib, "fits": fits, "experts_per_layer": dp.k if cfg.is_moe and fits else None,
                     "pool_slots": dp.slots if cfg.is_moe and fits else None,
                     "device_expert_bytes": dp.slots * sz.slot if cfg.is_moe and fits else None,
                     "device_total_bytes": dp.total() if fits else None,
                     "needs_bytes": dp.fixed() + (top if cfg.is_moe else 0)})
    return rows


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def format_figures(plan: dict) -> str:
    """figures() as the table --dry-run prints."""
    where = "CUDA device" if plan["device"] == "cuda" else "CPU (the device is RAM)"
    lines = [f"plan for {plan['model']} ({plan['source']}) on {where}, {plan['dtype']}, "
             f"KV window {plan['window']} tokens",
             f"  dense weights        {_size(plan['dense_bytes'])}",
             f"  KV cache             {_size(plan['kv_cache_bytes'])}",
             f"  activations (max)    {_size(plan['activation_bytes'])}"]
    if "experts" in plan:
        slots = _expert_line(plan)
        lines += [f"  expert slots         {slots}",
                  f"  codec scratch        {_size(plan['scratch_bytes'])}",
                  f"  host expert store    {_size(plan['host_expert_bytes'])} (pinned {_size(plan['pinned_bytes'])}, "
                  f"memory-mapped {_size(plan['mmapped_bytes'])})"]
    if plan["overhead_bytes"]:
        lines.append(f"  context, workspaces, margin  {_size(plan['overhead_bytes'])}")
    total = _size(plan["device_total_bytes"])
    if plan.get("experts_per_layer", 0) is None:
        total += " + the expert slots"
    lines += [f"  device total         {total}", f"  host RAM (at least)  {_size(plan['host_ram_bytes'])}"]
    if plan.get("note"):
        lines.append(f"  note: {plan['note']}")
    return "\n".join(lines)


def _expert_line(plan: dict) -> str:
    each = f"{plan['expert_slot_bytes'] / MIB:.1f} MiB each"
    if plan["experts"] == "resident":
        return f"{_size(plan['device_expert_bytes'])} (all {plan['num_experts']} per layer resident, {each})"
    if plan["experts"] == "cached":
        return (f"{_size(plan['device_expert_bytes'])} (all {plan['num_experts']} per layer, converted once, "
                f"{each}; read through the mapped store)")
    if plan["experts"] == "table":
        each += "; misses read in place from pinned host copies by the CUDA table kernels"
    if plan["experts_per_layer"] is None:
        return (f"chosen at load from the free device memory ({each}; give --device-memory GB to plan them); "
                f"store: {plan['store']}; pool: {plan.get('expert_pool')}")
    if plan.get("expert_pool") == "global":
        return (f"{_size(plan['device_expert_bytes'])} (one pool of {plan['pool_slots']} slots for every layer, "
                f"at least {plan['experts_per_layer']} of {plan['num_experts']} each, {each}; store: {plan['store']})")
    return (f"{_size(plan['device_expert_bytes'])} ({plan['experts_per_layer']} of {plan['num_experts']} per "
            f"layer, {each}; store: {plan['store']})")


def format_cards(rows: list[dict], num_experts: int) -> str:
    """cards() as a table."""
    lines = ["per card (GiB, as --device-memory):", "  card   experts/layer   expert slots   device total"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"  {r['card_gib']:4g}   too small: needs {_size(r['needs_bytes'])}")
            continue
        k = "-" if r["experts_per_layer"] is None else f"{r['experts_per_layer']} of {num_experts}"
        lines.append(f"  {r['card_gib']:4g}   {k:<15} {_size(r['device_expert_bytes']):<14} "
                     f"{_size(r['device_total_bytes'])}")
    return "\n".join(lines)
