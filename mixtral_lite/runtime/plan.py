"""The plan of one load: which checkpoint, on which device, in which dtype, with its experts where.

Every front end builds it once from its flags and hands it down; nothing below reads a flag:

    flags --plan_load--> LoadPlan --load.load--> build_model(path, experts=offloading.build(plan))
                          (checked here:            model + ExpertProvider
                           one-line errors            --> OffloadEngine(host store, codec, K slots,
                           naming the flag)                 cache policy, prefetch, miss policy)

runtime/sizing.py weighs the plan's pieces and places the experts, for a run and for `--dry-run`
(runtime/dry_run.py), which prints the same figures without loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import default_model_path
from ..model.config import ModelConfig
from ..model.source import model_unreadable, read_config
from .budget import GIB, dense_bytes, runtime_bytes
from .device import pick_device, pick_dtype

# On CUDA the shipped demo offloads 4 of its 8 experts per layer, to show the cache at work; on the
# CPU the "device" is the same RAM, so offloading there would only cost time and generate leaves it off
# (the chat and the server keep it on, for the hit rates their /stats show).
SHIPPED_EXPERTS_PER_LAYER = 4


@dataclass(frozen=True)
class ExpertChoice:
    """The expert-offloading flags as given (None: not given; runtime/flags.py says what each means)."""

    per_layer: int | None = None  # --experts-per-layer K: device slots per layer
    store: str | None = None  # --store ram|mmap: the experts' host home
    prefetch: bool = True  # --prefetch next
    device_memory: float | None = None  # --device-memory GiB: K from a budget instead
    cache_policy: str = "lru"  # --cache-policy
    miss_policy: str | None = None  # --miss-policy auto|copy|cpu (None: auto on CUDA, copy on the CPU)
    cpu_threads: int | None = None  # --cpu-threads: host threads for misses run on the CPU beside a GPU
    pool: str | None = None  # --expert-pool global|layer (None: global for --cache-policy lru, else layer)

    @property
    def expert_pool(self) -> str:
        """The pool a run builds: as given, else global under lru (benchmarks/replay_pool.py: never below the
        per-layer caches on the shipped traces) and per layer under lfu (with spare slots it fell below them on
        two traces) and markov (per layer only)."""
        return self.pool or ("global" if self.cache_policy == "lru" else "layer")

    @classmethod
    def from_args(cls, args) -> ExpertChoice:
        return cls(args.experts_per_layer, args.store, args.prefetch == "next", args.device_memory,
                   args.cache_policy, args.miss_policy, args.cpu_threads, getattr(args, "expert_pool", None))


@dataclass(frozen=True)
class LoadPlan:
    """Checked on construction: a plan that exists can be loaded as far as the flags go."""

    model_dir: Path
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    window: int  # KV window the memory is planned for: the model's sliding window, else -c
    chunk: int  # prompt tokens per prefill chunk (-b): sizes the activations
    experts: ExpertChoice = field(default_factory=ExpertChoice)
    threads: int | None = None  # -t (None: runtime.device.set_threads chooses)
    cuda_graphs: bool = True  # --cuda-graphs: decoding steps replayed as CUDA graphs where they can be

    def __post_init__(self):
        check(self)


def plan_load(args, *, show_cache_on_cpu: bool = False, planning: bool = False) -> LoadPlan:
    """The plan from the model flags (runtime/flags.py's add_model_args, or at least -m, --device, --dtype,
    ctx_size, batch_size and the offload flags). The shipped model offloads on CUDA, and also on the CPU
    with show_cache_on_cpu (the chat and the server). planning (--dry-run): --device cuda needs no GPU here."""
    model_dir = args.model or default_model_path()
    why = model_unreadable(model_dir)
    if why:
        raise SystemExit(f"error: -m/--model: {why}")
    config = read_config(model_dir)
    device = torch.device("cuda") if planning and args.device == "cuda" else pick_device(args.device)
    dtype = pick_dtype(args.dtype, config, device)
    experts = ExpertChoice.from_args(args)
    if (args.model is None and (device.type == "cuda" or show_cache_on_cpu)
            and experts.per_layer is None and experts.device_memory is None):
        experts = replace(experts, per_layer=SHIPPED_EXPERTS_PER_LAYER)
    return LoadPlan(model_dir, config, device, dtype, window=config.sliding_window or args.ctx_size,
                    chunk=args.batch_size, experts=experts,
                    threads=getattr(args, "threads", None),  # perplexity has no -t: it leaves torch's threads alone
                    cuda_graphs=getattr(args, "cuda_graphs", "on") == "on")


def check(plan: LoadPlan) -> None:
    """One-line errors naming the flag, before anything loads."""
    cfg, e, k = plan.config, plan.experts, plan.experts.per_layer
    if k is not None and e.device_memory is not None:
        raise SystemExit("error: give either --experts-per-layer or --device-memory, not both")
    if not cfg.is_moe:
        if k is not None or e.store is not None:
            flag = "--experts-per-layer" if k is not None else "--store"
            raise SystemExit(f"error: {flag}: the model is dense (no experts to offload)")
        if e.device_memory is not None:
            need = dense_bytes(cfg, plan.dtype) + sum(runtime_bytes(cfg, plan.dtype, plan.window, plan.chunk))
            if need > e.device_memory * GIB:
                raise SystemExit(f"error: --device-memory {e.device_memory:g} GiB is too small for the "
                                 f"dense model ({need / GIB:.2f} GiB with KV cache and activations)")
        return
    if k is not None and not cfg.experts_per_tok <= k <= cfg.num_experts:
        raise SystemExit(f"error: --experts-per-layer {k}: must be between experts_per_tok "
                         f"({cfg.experts_per_tok}) and num_experts ({cfg.num_experts})")
    if e.expert_pool == "global" and e.cache_policy not in ("lru", "lfu"):
        raise SystemExit(f"error: --expert-pool global: takes --cache-policy lru or lfu, not {e.cache_policy} "
                         "(give --expert-pool layer)")
    if e.device_memory is not None and e.device_memory <= 0:
        raise SystemExit(f"error: --device-memory {e.device_memory:g}: must be a positive number of GiB")
