"""How many expert slots per layer fit a device: --device-memory, or on CUDA what is free.

Everything a run puts on the device is counted, not only what torch's allocator reports:

    dense weights + KV cache + activations (prefill chunk)      the model's own
    math-attention peak at prefill                               scores [H, T, S] and their softmax:
        with a mask and GQA, flash attention is ruled out (about 290 MiB at T = 512, S = 4608)
    codec scratch + device staging                               dequantize / convert buffers
    CUDA context (--device-memory only) + cuBLAS workspaces      invisible to memory_allocated()
    margin (5%, at least 256 MiB)                                allocator fragmentation
    the expert pool                                              --expert-pool layer: K x layers x slot bytes;
                                                                 global: N x slot bytes, N = what is left
                                                                 // slot bytes (at most layers x experts),
                                                                 so less than one slot's bytes stay idle

With --device-memory GB the budget is the card; without it (a quantized store, or --store with
no K, on CUDA) it is what `torch.cuda.mem_get_info()` says is free once the dense weights are
loaded, so the context and the dense weights are already out of it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..model.checkpoint import expected_shapes
from ..model.config import ModelConfig
from ..model.kv_cache import kv_cache_bytes

GIB, MIB = 1 << 30, 1 << 20
CUDA_CONTEXT = 512 * MIB  # context + module images: 0.3-0.5 GiB on current drivers
CUBLAS_WORKSPACE = 64 * MIB  # cuBLAS / cuBLASLt workspaces of the compute and copy streams
MARGIN, MARGIN_MIN = 0.05, 256 * MIB  # fragmentation of the caching allocator


def dense_bytes(cfg: ModelConfig, dtype: torch.dtype, ckpt=None) -> int:
    """Every non-expert weight on the device: in the compute dtype, or as a quantized store holds them."""
    if hasattr(ckpt, "dense_device_bytes"):
        return ckpt.dense_device_bytes(dtype)
    n = sum(torch.Size(s).numel() for name, s in expected_shapes(cfg).items() if ".experts." not in name)
    return n * dtype.itemsize


def attention_bytes(cfg: ModelConfig, dtype: torch.dtype, window: int, chunk: int) -> int:
    """Peak of math attention over a chunk: scores and softmax [H, T, S], keys and values repeated to H heads."""
    scores = 2 * cfg.num_heads * chunk * window * dtype.itemsize
    return scores + 2 * cfg.num_heads * window * cfg.head_dim * dtype.itemsize


def runtime_bytes(cfg: ModelConfig, dtype: torch.dtype, window: int, chunk: int) -> tuple[int, int]:
    """(KV cache, activations incl. the attention peak) for batch 1, a KV window and a prefill chunk."""
    kv = kv_cache_bytes(cfg, window, dtype)
    # per token of a chunk: residual + norms + q/k/v/o, the expert's hidden pair, and the logits row (fp32)
    per_token = (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * dtype.itemsize + 4 * cfg.vocab_size
    return kv, chunk * per_token + attention_bytes(cfg, dtype, window, chunk)


@dataclass
class DevicePlan:
    budget: int
    dense: int  # 0 when the budget was measured after the dense weights were loaded
    kv: int
    activations: int
    scratch: int
    overhead: int  # context + cuBLAS workspaces + margin (0 on the CPU)
    slot_bytes: int
    layers: int
    k: int = 0  # slots per layer (global pool: each layer's quota, N // layers)
    pool: str = "layer"  # --expert-pool: "layer" (K per layer) or "global" (N shared)
    slots: int = 0  # every slot of the pool: K x layers, or N (0: K x layers)

    def __post_init__(self):
        self.slots = self.slots or self.k * self.layers

    def fixed(self) -> int:
        return self.dense + self.kv + self.activations + self.scratch + self.overhead

    def total(self) -> int:
        return self.fixed() + self.slots * self.slot_bytes

    def engine_slots(self) -> int:
        """What the engines take as `slots`: K per layer, or N in all."""
        return self.slots if self.pool == "global" else self.k

    def describe_slots(self) -> str:
        if self.pool == "global" and self.slots != self.k * self.layers:  # else: the per-layer cache exactly
            return f"{self.slots} expert slots shared by every layer (at least {self.k} each)"
        return f"{self.k} experts per layer"

    def describe(self) -> str:
        return (f"dense weights {self.dense / GIB:.2f} + KV cache {self.kv / GIB:.2f} + activations "
                f"{self.activations / GIB:.2f} + scratch {self.scratch / GIB:.2f} + context, workspaces "
                f"and margin {self.overhead / GIB:.2f} GiB")


def plan_slots(cfg: ModelConfig, dtype: torch.dtype, budget: int, slot_bytes: int, *, window: int, chunk: int,
               device: torch.device, scratch: int = 0, measured: bool = False, dense: int | None = None,
               pool: str = "layer") -> DevicePlan:
    """The largest pool that fits `budget` bytes: K per layer (up to num_experts; may come out below top_k), or
    for the global pool N slots (up to layers x experts) with K = N // layers."""
    kv, act = runtime_bytes(cfg, dtype, window, chunk)
    overhead = 0
    if device.type == "cuda":
        overhead = CUBLAS_WORKSPACE + max(MARGIN_MIN, int(MARGIN * budget)) + (0 if measured else CUDA_CONTEXT)
    dense = dense_bytes(cfg, dtype) if dense is None else dense
    plan = DevicePlan(budget, 0 if measured else dense, kv, act, scratch, overhead,
                      slot_bytes, cfg.num_layers, pool=pool)
    n = min(cfg.num_layers * cfg.num_experts, max(budget - plan.fixed(), 0) // slot_bytes)
    plan.k = min(cfg.num_experts, n // cfg.num_layers)
    plan.slots = n if pool == "global" else plan.k * cfg.num_layers
    return plan


def free_bytes(device: torch.device) -> int:
    """What this process can still allocate on `device`: the driver's free memory plus torch's cached blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def choose_slots(cfg: ModelConfig, dtype: torch.dtype, slot_bytes: int, *, window: int, chunk: int,
                 device: torch.device, scratch: int, gib: float | None, dense: int | None = None,
                 pool: str = "layer") -> DevicePlan:
    """K from --device-memory GiB (gib), or from the free memory of a CUDA device; exits naming the flag."""
    measured = gib is None
    budget = free_bytes(device) if measured else int(gib * GIB)
    plan = plan_slots(cfg, dtype, budget, slot_bytes, window=window, chunk=chunk, device=device,
                      scratch=scratch, measured=measured, dense=dense, pool=pool)
    what = "free device memory" if measured else f"--device-memory {gib:g} GiB"
    if plan.k < cfg.experts_per_tok:
        top = cfg.experts_per_tok * cfg.num_layers * slot_bytes
        raise SystemExit(f"error: {what} is too small: {plan.describe()} + {cfg.experts_per_tok} expert slots per "
                         f"layer {top / GIB:.2f} GiB needs at least {(plan.fixed() + top) / GIB:.2f} GiB"
                         + ("" if gib else f" ({budget / GIB:.2f} GiB free); give --device-memory or free the GPU"))
    print(f"offload: {what} -> {plan.describe_slots()} ({plan.slots * slot_bytes / GIB:.2f} GiB "
          f"of expert slots; plan {plan.total() / GIB:.2f} of {budget / GIB:.2f} GiB)", file=sys.stderr)
    return plan


def check_reserved(plan: DevicePlan, grew: int) -> str | None:
    """A warning when allocating the pool reserved more than the plan gave the slots and scratch."""
    want = plan.slots * plan.slot_bytes + plan.scratch
    slack = max(MARGIN_MIN, int(MARGIN * plan.budget))
    if grew <= want + slack:
        return None
    return (f"warning: building the expert pool reserved {grew / GIB:.2f} GiB on the device, the plan gave it "
            f"{want / GIB:.2f} GiB; if the run runs out of memory, lower --device-memory")
