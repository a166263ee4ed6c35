"""Mixtral's experts through the offload engine: the ExpertProvider, the CLI flags, the budget.

This is where the model meets `offload/`: it names the expert tensors (HF
`...experts.{e}.w1|w2|w3.weight`, or the quantized store's packed tensor), supplies the
expert math (SwiGLU), and turns flags into an `OffloadEngine`:

    --experts-per-layer K   device slots per layer (top_k <= K <= num_experts)
    --store {ram,mmap}      experts' host home: packed in RAM (pinned on CUDA) or read in place
    --prefetch {off,next}   speculative loads from the next layer's router (default next)
    --device-memory GB      choose K from a device budget instead (GiB)
    --cache-policy NAME     eviction policy (offload/policy.py)
"""

from __future__ import annotations

import sys

import torch

from offload.codec import PlainCodec
from offload.engine import OffloadEngine, slot_layout
from offload.fused import FusedCodec
from offload.store import RamStore, SafetensorsSource

from .checkpoint import expected_shapes, expert_name
from .config import ModelConfig
from .experts import FusedResidentExperts, expert_function
from .kv_cache import kv_cache_bytes
from .offload_args import add_args, live_policies  # noqa: F401  (their home before)

ROLES = ("w1", "w2", "w3")  # the order swiglu_expert takes them
GIB = 1 << 30


class OffloadedExperts:
    """ExpertProvider over an OffloadEngine: one host sync per layer for ids and guess together."""

    def __init__(self, engine: OffloadEngine, prefetch: bool):
        self.engine, self._prefetch = engine, prefetch

    @property
    def wants_guess(self) -> bool:
        return self._prefetch

    def run(self, layer, x, ids, weights, next_guess=None):
        # x [T, D]; ids, next_guess [T, A]; weights [T, A]
        if next_guess is not None and self._prefetch:
            rows = torch.cat([ids, next_guess], dim=1).tolist()  # the layer's single host sync
            a = ids.shape[1]
            ids_host, guess_host = [r[:a] for r in rows], [r[a:] for r in rows]
        else:
            ids_host, guess_host = ids.tolist(), None
        return self.engine.run(layer, x, ids_host, weights, guess_host)

    def stats(self) -> dict:
        return self.engine.stats()


def dense_bytes(cfg: ModelConfig, dtype: torch.dtype, ckpt=None) -> int:
    """Every non-expert weight on the device: in the compute dtype, or as a quantized store holds them."""
    if hasattr(ckpt, "dense_device_bytes"):
        return ckpt.dense_device_bytes(dtype)
    n = sum(torch.Size(s).numel() for name, s in expected_shapes(cfg).items() if ".experts." not in name)
    return n * dtype.itemsize


def runtime_bytes(cfg: ModelConfig, dtype: torch.dtype, window: int, chunk: int) -> tuple[int, int]:
    """(KV cache, activations) estimates for batch 1, a KV window and a prefill chunk of tokens."""
    kv = kv_cache_bytes(cfg, window, dtype)
    # per token of a chunk: residual + norms + q/k/v/o, the expert's hidden pair, attention
    # scores over the window, and the logits row (fp32): a generous upper estimate
    per_token = (6 * cfg.hidden_size + 3 * cfg.intermediate_size + cfg.num_heads * window) * dtype.itemsize
    return kv, chunk * (per_token + 4 * cfg.vocab_size)


def slots_for_budget(args, cfg: ModelConfig, dtype: torch.dtype, expert_bytes: int, ckpt=None) -> int:
    """K from --device-memory; error naming the flag when even top_k slots do not fit."""
    window = cfg.sliding_window or getattr(args, "ctx_size", None) or cfg.max_position_embeddings
    kv, act = runtime_bytes(cfg, dtype, window, getattr(args, "batch_size", None) or 512)
    dense, top = dense_bytes(cfg, dtype, ckpt), cfg.experts_per_tok * cfg.num_layers * expert_bytes
    left = int(args.device_memory * GIB) - dense - kv - act
    k = min(cfg.num_experts, max(left, 0) // (cfg.num_layers * expert_bytes))
    if k < cfg.experts_per_tok:
        need = dense + kv + act + top
        raise SystemExit(
            f"error: --device-memory {args.device_memory:g} GiB is too small: dense weights "
            f"{dense / GIB:.2f} + KV cache {kv / GIB:.2f} + activations {act / GIB:.2f} + "
            f"{cfg.experts_per_tok} expert slots per layer {top / GIB:.2f} GiB needs at least {need / GIB:.2f} GiB")
    print(f"offload: --device-memory {args.device_memory:g} GiB -> {k} experts per layer "
          f"({k * cfg.num_layers * expert_bytes / GIB:.2f} GiB of expert slots)", file=sys.stderr)
    return k


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
        return None
    return make_factory(slots=k, store=args.store or "ram", prefetch=args.prefetch == "next",
                        policy=args.cache_policy, budget_args=args if args.device_memory is not None else None)


def make_factory(*, slots: int | None, store: str = "ram", prefetch: bool = True, policy: str = "lru",
                 budget_args=None):
    """factory(config, checkpoint, device, dtype) -> OffloadedExperts."""
    def factory(cfg: ModelConfig, ckpt, device, dtype) -> OffloadedExperts | FusedResidentExperts:
        device = torch.device(device)
        if slots in (None, cfg.num_experts) and budget_args is None and hasattr(ckpt, "expert_store"):
            # every expert cached: read each once through the mapping (no RAM copy of the store beside the
            # converted experts) and keep it in the kernel's layout, with no cache to keep
            host, codec = open_experts(cfg, ckpt, "mmap", device, dtype)
            if isinstance(codec, FusedCodec):
                return FusedResidentExperts(host, codec, device)
        host, codec = open_experts(cfg, ckpt, store, device, dtype)
        k = slots_for_budget(budget_args, cfg, dtype, slot_layout(codec, host).nbytes, ckpt) if budget_args else slots
        k = k or cfg.num_experts
        guess = prefetch and k < cfg.num_experts  # with every expert cached a guess has nothing to load
        engine = OffloadEngine(host, codec, expert_function(codec), k, device, policy=policy, prefetch=guess)
        return OffloadedExperts(engine, guess)
    return factory


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
    source = SafetensorsSource(files, cfg.num_layers, cfg.num_experts,
                               lambda layer, e: {w: expert_name(layer, e, w) for w in ROLES},
                               {"w1": (i, d), "w2": (d, i), "w3": (i, d)})
    host = RamStore(source, pin=pin) if store == "ram" else source
    return host, PlainCodec(host.layout, ROLES, dtype, device)
