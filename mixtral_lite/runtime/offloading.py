"""Mixtral's experts through the offload engine: the ExpertProvider, the CLI flags, the budget.

This is where the model meets `offload/`: it names the expert tensors (HF
`...experts.{e}.w1|w2|w3.weight`, or the quantized store's packed tensor), supplies the
expert math (SwiGLU), and turns flags into an `OffloadEngine`:

    --experts-per-layer K   device slots per layer (top_k <= K <= num_experts)
    --store {ram,mmap}      experts' host home: packed in RAM (pinned on CUDA) or read in place
    --prefetch {off,next}   speculative loads from the next layer's router (default next)
    --device-memory GB      choose K from a device budget instead (GiB; mixtral_lite/budget.py)
    (none of them, on CUDA) K from the free device memory, never every expert blindly
    --cache-policy NAME     eviction policy (offload/policy.py)
    --miss-policy {auto,copy,cpu}  where a miss runs (offload/miss_policy.py); --cpu-threads N its host threads
"""

from __future__ import annotations

import sys

import torch

from offload.codec import PlainCodec, slot_layout
from offload.engine import OffloadEngine
from offload.fused import FusedCodec
from offload.host_experts import HostExperts, calibrate
from offload.hostsync import to_host
from offload.miss_policy import MissPolicy
from offload.prepacked import PrepackedCodec
from offload.store import RamStore, SafetensorsSource

from ..model.checkpoint import expert_name
from ..model.config import ModelConfig
from ..model.experts import FusedResidentExperts, expert_function
from .budget import GIB, DevicePlan, check_reserved, choose_slots, dense_bytes, runtime_bytes  # noqa: F401
from .flags import add_args, live_policies  # noqa: F401  (their home before)

ROLES = ("w1", "w2", "w3")  # the order swiglu_expert takes them
STACKED_ORDER = ("w1", "w3", "w2")  # their order in a slot


class OffloadedExperts:
    """ExpertProvider over an OffloadEngine: one host sync per layer for ids and guess together."""

    def __init__(self, engine: OffloadEngine, prefetch: bool):
        self.engine, self._prefetch = engine, prefetch

    @property
    def wants_guess(self) -> bool:
        return self._prefetch

    def run(self, layer, x, ids, weights, next_guess=None):
        # x [T, D]; ids, next_guess [T, A]; weights [T, A]
        self.engine.stage_rows(x)  # rows for host experts: covered by the sync below
        if next_guess is not None and self._prefetch:
            rows = to_host(torch.cat([ids, next_guess], dim=1))  # the layer's single host sync
            a = ids.shape[1]
            ids_host, guess_host = [r[:a] for r in rows], [r[a:] for r in rows]
        else:
            ids_host, guess_host = to_host(ids), None
        return self.engine.run(layer, x, ids_host, weights, guess_host)

    def stats(self) -> dict:
        return self.engine.stats()


def slots_for_budget(args, cfg: ModelConfig, dtype: torch.dtype, expert_bytes: int, scratch: int = 0,
                     device: torch.device | None = None) -> int:
    """K from --device-memory (see mixtral_lite/budget.py); error naming the flag when top_k slots do not fit."""
    return _plan(args, cfg, dtype, expert_bytes, scratch, device or torch.device("cpu"), args.device_memory).k


def _plan(args, cfg: ModelConfig, dtype, slot_bytes: int, scratch: int, device, gib: float | None,
          ckpt=None) -> DevicePlan:
    # without flags (load_model's default for stores): generate's default -c 4096
    window = cfg.sliding_window or getattr(args, "ctx_size", None) or min(cfg.max_position_embeddings, 4096)
    return choose_slots(cfg, dtype, slot_bytes, window=window, chunk=getattr(args, "batch_size", None) or 512,
                        device=device, scratch=scratch, gib=gib, dense=dense_bytes(cfg, dtype, ckpt))


def scratch_bytes(codec, host, device: torch.device) -> int:
    """Device bytes the codec and the transfer use beside the slots: decode/convert scratch, device staging."""
    n = codec.scratch_bytes() if hasattr(codec, "scratch_bytes") else 0
    if device.type == "cuda" and slot_layout(codec) != host.layout:
        n += host.layout.nbytes  # load_converting's device staging buffer
    return n


def _validate(args, cfg: ModelConfig) -> None:
    k = args.experts_per_layer
    if k is not None and args.device_memory is not None:
        raise SystemExit("error: give either --experts-per-layer or --device-memory, not both")
    if not cfg.is_moe:
        if k is not None or args.store is not None:
            flag = "--experts-per-layer" if k is not None else "--store"
            raise SystemExit(f"error: {flag}: the model is dense (no experts to offload)")
        return
    if k is not None and not cfg.experts_per_tok <= k <= cfg.num_experts:
        raise SystemExit(f"error: --experts-per-layer {k}: must be between experts_per_tok "
                         f"({cfg.experts_per_tok}) and num_experts ({cfg.num_experts})")
    if args.device_memory is not None and args.device_memory <= 0:
        raise SystemExit(f"error: --device-memory {args.device_memory:g}: must be a positive number of GiB")


def build(args, config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The experts factory load_model takes, or None when every expert stays resident."""
    _validate(args, config)
    if not config.is_moe:
        if args.device_memory is not None:
            need = dense_bytes(config, dtype) + sum(runtime_bytes(
                config, dtype, config.sliding_window or args.ctx_size, args.batch_size))
            if need > args.device_memory * GIB:
                raise SystemExit(f"error: --device-memory {args.device_memory:g} GiB is too small for the "
                                 f"dense model ({need / GIB:.2f} GiB with KV cache and activations)")
        return None
    k = args.experts_per_layer
    if (k is None or k == config.num_experts) and args.store is None and args.device_memory is None:
        if k is None and device.type == "cuda":  # a quantized store must not ask for all its experts
            return make_factory(slots=None, prefetch=args.prefetch == "next", policy=args.cache_policy,
                                budget_args=args, resident_checkpoints=True, **_miss_args(args))
        return None
    return make_factory(slots=k, store=args.store or "ram", prefetch=args.prefetch == "next",
                        policy=args.cache_policy, budget_args=args if k is None else None, **_miss_args(args))


def _miss_args(args) -> dict:
    return {"miss_policy": getattr(args, "miss_policy", None), "cpu_threads": getattr(args, "cpu_threads", None)}


def make_factory(*, slots: int | None, store: str = "ram", prefetch: bool = True, policy: str = "lru",
                 budget_args=None, transfer=None, resident_checkpoints: bool = False,
                 miss_policy: str | MissPolicy | None = None, cpu_threads: int | None = None):
    """factory(config, checkpoint, device, dtype) -> OffloadedExperts.

    slots None: K from budget_args.device_memory when given, else on CUDA from the free device memory
    (never every expert blindly: 22 GiB at 4 bits), else (the CPU) every expert.
    transfer: passed to OffloadEngine (a test's transfer over the fake CUDA backend).
    resident_checkpoints: a Hugging Face checkpoint keeps every expert resident (only stores offload).
    miss_policy: auto, copy or cpu (default auto on CUDA, copy on the CPU), or a MissPolicy (a test's script).
    """
    def factory(cfg: ModelConfig, ckpt, device, dtype) -> OffloadedExperts:
        device = torch.device(device)
        if resident_checkpoints and not hasattr(ckpt, "expert_store"):
            from ..model.transformer import resident_experts  # model imports this module: import when called

            return resident_experts(cfg, ckpt, device, dtype)
        gib = getattr(budget_args, "device_memory", None)
        if hasattr(ckpt, "expert_store") and (slots == cfg.num_experts or (
                slots is None and gib is None and device.type != "cuda")):
            # every expert cached: read each once through the mapping (no RAM copy of the store beside the
            # converted experts) and keep it in the kernel's layout, with no cache to keep
            host, codec = open_experts(cfg, ckpt, "mmap", device, dtype)
            if isinstance(codec, (FusedCodec, PrepackedCodec)):
                return FusedResidentExperts(host, codec, device)
        host, codec = open_experts(cfg, ckpt, store, device, dtype)
        plan = None
        if slots is None and (gib is not None or device.type == "cuda"):
            plan = _plan(budget_args, cfg, dtype, slot_layout(codec).nbytes,
                         scratch_bytes(codec, host, device), device, gib, ckpt)
        k = plan.k if plan else slots or cfg.num_experts
        before = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
        guess = prefetch and k < cfg.num_experts  # with every expert cached a guess has nothing to load
        misses, host_side = _misses(miss_policy, cpu_threads, k < cfg.num_experts, cfg, ckpt, host, codec,
                                    device, dtype)
        engine = OffloadEngine(host, codec, expert_function(codec), k, device, policy=policy, prefetch=guess,
                               transfer=transfer, miss_policy=misses, host=host_side)
        if plan is not None and device.type == "cuda":
            warning = check_reserved(plan, torch.cuda.memory_reserved(device) - before)
            if warning:
                print(warning, file=sys.stderr)
        return OffloadedExperts(engine, guess)
    return factory


def _misses(choice, threads, offloading: bool, cfg, ckpt, host, codec, device, dtype):
    """(MissPolicy, HostExperts or None); auto is calibrated here and the cost model printed."""
    if isinstance(choice, MissPolicy):  # a test's policy, e.g. a scripted mix
        return choice, _host_side(ckpt, host, codec, device, dtype)
    mode = choice or ("auto" if device.type == "cuda" else "copy")
    if mode == "auto" and device.type != "cuda":
        # both paths run on the same cores: a host run saves no time that a copy would cost
        print("miss policy: auto on the CPU device copies (both paths share the cores)", file=sys.stderr)
        mode = "copy"
    if mode == "copy" or not offloading:
        return MissPolicy("copy"), None
    if threads is not None and device.type == "cuda":
        torch.set_num_threads(threads)
    side = _host_side(ckpt, host, codec, device, dtype)
    if not side.in_place and hasattr(ckpt, "expert_store"):
        print(f"miss policy {mode}: each expert run on the host is first converted into the CPU kernel's layout "
              "(a full-size one: 0.24-0.45 s on one core, measured); a store made with quantize_experts.py "
              "--prepack is read in place", file=sys.stderr)
    costs = calibrate(side, codec, expert_function(codec), cfg.hidden_size, dtype, device) if mode == "auto" else None
    policy = MissPolicy(mode, costs)
    print(policy.describe(), file=sys.stderr)
    return policy, side


def _host_side(ckpt, host, codec, device, dtype) -> HostExperts:
    """Experts computed on the host: the engine's own codec on the CPU device, a CPU codec beside a GPU."""
    if device.type == "cpu":
        h_codec = codec
    elif hasattr(ckpt, "expert_store"):
        h_codec = ckpt.codec(torch.device("cpu"), dtype)
    else:
        h_codec = PlainCodec(host.layout, ROLES, dtype, "cpu", stack={"w13": ("w1", "w3")})
    return HostExperts(host, h_codec, expert_function(h_codec))


def default_factory():
    """For stores with no resident path (the quantized store): every expert cached, from RAM."""
    return make_factory(slots=None)


def open_experts(cfg: ModelConfig, ckpt, store: str, device: torch.device, dtype: torch.dtype):
    """(host store, codec) for a Hugging Face checkpoint or a quantized store."""
    pin = device.type == "cuda"
    if hasattr(ckpt, "expert_store"):  # the quantized store (mixtral_lite.qstore)
        return ckpt.expert_store(store, pin=pin), ckpt.codec(device, dtype)
    i, d = cfg.intermediate_size, cfg.hidden_size
    files = sorted({ckpt.file_of(expert_name(layer, e, w)) for layer in range(cfg.num_layers)
                    for e in range(cfg.num_experts) for w in ROLES})
    # w1, w3, then w2 in the packed expert: w1 and w3 back to back decode as one [2I, D] matrix, the
    # product ResidentExperts runs for a decoding token (on a GPU two products could differ in the last bits)
    source = SafetensorsSource(files, cfg.num_layers, cfg.num_experts,
                               lambda layer, e: {w: expert_name(layer, e, w) for w in STACKED_ORDER},
                               {"w1": (i, d), "w2": (d, i), "w3": (i, d)})
    host = RamStore(source, pin=pin) if store == "ram" else source
    return host, PlainCodec(host.layout, ROLES, dtype, device, stack={"w13": ("w1", "w3")})
