"""Mixtral's experts through the offload engine: the factory that turns a plan's expert choice into an
ExpertProvider over an `OffloadEngine`.

This is where the model meets `offload/`: it names the expert tensors (HF
`...experts.{e}.w1|w2|w3.weight`, or the quantized store's packed tensor), supplies the
expert math (SwiGLU, model/experts.py), and builds the engine from the plan (runtime/plan.py):

    K slots per layer       --experts-per-layer, or from --device-memory / the free CUDA memory (budget.py)
    host store              --store ram (packed in RAM, pinned on CUDA) | mmap (read in place)
    prefetch                --prefetch next: speculative loads from the next layer's router
    eviction                --cache-policy (offload/policy.py)
    where a miss runs       --miss-policy read (CUDA: offload/table.py) | auto|copy|cpu (offload/miss_policy.py),
                            --cpu-threads N
"""

from __future__ import annotations

import sys

import psutil
import torch

from offload import triton_moe
from offload.codec import PlainCodec, slot_layout
from offload.engine import OffloadEngine
from offload.fused import FusedCodec
from offload.ggml_codec import GGMLCodec
from offload.host_experts import HostExperts, calibrate
from offload.hostsync import to_host
from offload.miss_policy import MissPolicy
from offload.prefetch import PrefetchBudget
from offload.prepacked import PrepackedCodec
from offload.rows import scratch_bytes as rows_scratch_bytes
from offload.store import RamStore, SafetensorsSource
from offload.table import TableEngine

from ..model.build import resident_experts
from ..model.checkpoint import expert_name
from ..model.config import ModelConfig
from ..model.experts import FusedResidentExperts, expert_function
from .budget import GIB, DevicePlan, check_reserved, choose_slots, dense_bytes
from .flags import READ
from .plan import LoadPlan

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


def _device_plan(cfg: ModelConfig, dtype, slot_bytes: int, scratch: int, device, gib: float | None,
                 window: int | None, chunk: int | None, ckpt=None, pool: str = "layer") -> DevicePlan:
    # without a LoadPlan (load_model's default for stores): generate's default -c 4096 and -b 512
    window = cfg.sliding_window or window or min(cfg.max_position_embeddings, 4096)
    return choose_slots(cfg, dtype, slot_bytes, window=window, chunk=chunk or 512, device=device, scratch=scratch,
                        gib=gib, dense=dense_bytes(cfg, dtype, ckpt), pool=pool)


def scratch_bytes(codec, host, device: torch.device) -> int:
    """Device bytes the codec and the transfer use beside the slots: decode/convert scratch, device staging."""
    n = codec.scratch_bytes() if hasattr(codec, "scratch_bytes") else 0
    if device.type == "cuda" and slot_layout(codec) != host.layout:
        n += host.layout.nbytes  # load_converting's device staging buffer
    return n


def build(plan: LoadPlan, placement):
    """The experts factory for the placement the planner chose (runtime/sizing.decide), or None when every
    expert stays resident."""
    e = plan.experts
    if placement.experts in ("none", "resident"):
        return None
    common = {"prefetch": e.prefetch, "policy": e.cache_policy, "miss_policy": e.miss_policy,
              "cpu_threads": e.cpu_threads, "window": plan.window, "chunk": plan.chunk, "pool": placement.pool}
    return make_factory(slots=placement.k, store=placement.store or "ram", device_plan=placement.budget, **common)


def make_factory(*, slots: int | None, store: str = "ram", prefetch: bool = True, policy: str = "lru",
                 device_memory: float | None = None, window: int | None = None, chunk: int | None = None,
                 transfer=None, resident_checkpoints: bool = False,
                 miss_policy: str | MissPolicy | None = None, cpu_threads: int | None = None,
                 device_plan: DevicePlan | None = None, pool: str = "layer"):
    """factory(config, checkpoint, device, dtype) -> ExpertProvider (OffloadedExperts, or resident ones).

    slots None: K from device_memory (GiB) when given, else on CUDA from the free device memory
    (never every expert blindly: 22 GiB at 4 bits), else (the CPU) every expert; window and chunk
    (-c and -b) size the KV cache and activations the budget leaves room for.
    transfer: passed to OffloadEngine (a test's transfer over the fake CUDA backend).
    resident_checkpoints: a Hugging Face checkpoint keeps every expert resident (only stores offload).
    miss_policy: auto, copy or cpu (default auto on CUDA, copy on the CPU), or a MissPolicy (a test's script).
    device_plan: the --device-memory plan the run's planner made (runtime/sizing.py): K is its k.
    pool: "layer" (slots = K per layer) or "global" (one pool of the plan's N slots, or K x layers;
    offload/global_cache.py).
    """
    def factory(cfg: ModelConfig, ckpt, device, dtype) -> OffloadedExperts:
        device = torch.device(device)
        if resident_checkpoints and not hasattr(ckpt, "expert_store"):
            return resident_experts(cfg, ckpt, device, dtype)
        if miss_policy == READ and not (device.type == "cuda" and hasattr(ckpt, "rows_codec")):
            raise SystemExit("error: --miss-policy read: needs --device cuda and a quantized store "
                             "(tools/quantize_experts.py)")
        if device.type == "cuda" and miss_policy in (None, READ) and hasattr(ckpt, "rows_codec"):
            engine = table_engine(cfg, ckpt, device, dtype, slots, device_memory, window, chunk, policy, store,
                                  required=miss_policy == READ, pool=pool)
            if engine is not None:
                return engine
        if hasattr(ckpt, "expert_store") and (slots == cfg.num_experts or (
                slots is None and device_memory is None and device.type != "cuda")):
            # every expert cached: read each once through the mapping (no RAM copy of the store beside the
            # converted experts) and keep it in the kernel's layout, with no cache to keep
            host, codec = open_experts(cfg, ckpt, "mmap", device, dtype)
            if isinstance(codec, (FusedCodec, PrepackedCodec, GGMLCodec)):
                check_resident_ram(cfg, ckpt, codec, device)
                return FusedResidentExperts(host, codec, device)
        host, codec = open_experts(cfg, ckpt, store, device, dtype)
        budget = device_plan
        if budget is None and slots is None and (device_memory is not None or device.type == "cuda"):
            budget = _device_plan(cfg, dtype, slot_layout(codec).nbytes, scratch_bytes(codec, host, device),
                                  device, device_memory, window, chunk, ckpt, pool)
        k = budget.k if budget else slots or cfg.num_experts
        n = budget.engine_slots() if budget else (k * cfg.num_layers if pool == "global" else k)
        before = torch.cuda.memory_reserved(device) if device.type == "cuda" else 0
        guess = prefetch and k < cfg.num_experts  # with every expert cached a guess has nothing to load
        misses, host_side = _misses(miss_policy, cpu_threads, k < cfg.num_experts, cfg, ckpt, host, codec,
                                    device, dtype)
        engine = OffloadEngine(host, codec, expert_function(codec), n, device, policy=policy, prefetch=guess,
                               transfer=transfer, miss_policy=misses, host=host_side, pool=pool,
                               prefetch_budget=_prefetch_budget(guess, misses, host_side, ckpt, codec, cfg,
                                                                device, dtype, host))
        if budget is not None and device.type == "cuda":
            warning = check_reserved(budget, torch.cuda.memory_reserved(device) - before)
            if warning:
                print(warning, file=sys.stderr)
        return OffloadedExperts(engine, guess)
    return factory


def check_resident_ram(cfg: ModelConfig, ckpt, codec, device: torch.device) -> None:
    """Every expert converted into the kernel's layout in RAM at load: one line, before any is, where they
    would not fit in the memory available (the store's own hint says how else to run it)."""
    if device.type != "cpu" or getattr(codec, "in_place", False):
        return
    need = cfg.num_layers * cfg.num_experts * slot_layout(codec).nbytes
    free = psutil.virtual_memory().available
    if need > 0.9 * free:
        hint = getattr(ckpt, "resident_hint", "re-make the store with quantize_experts.py --prepack (read in place)")
        raise SystemExit(f"error: every expert converted into the int4 kernel's layout takes {need / GIB:.1f} GiB, "
                         f"more than the {free / GIB:.1f} GiB of RAM available: {hint}, or give "
                         "--experts-per-layer K (K slots per layer, each miss converted)")


def table_engine(cfg: ModelConfig, ckpt, device: torch.device, dtype, slots: int | None,
                 device_memory: float | None, window, chunk, policy: str, store: str, required: bool,
                 pool: str = "layer"):
    """A TableEngine (offload/table.py) for a quantized store on CUDA, or None (why printed) where its
    kernels or layout are unavailable here and --miss-policy read was not asked for (then: an error)."""
    why = triton_moe.self_check(device) or triton_moe.shape_unsupported(cfg.hidden_size, cfg.intermediate_size,
                                                                          ckpt.spec.group_size)
    codec = None if why else ckpt.rows_codec(device)
    if codec is None:
        why = why or getattr(ckpt, "rows_note", "")
    elif store == "mmap":
        why = "--store mmap: the kernels read missed experts from pinned RAM (the converted copies)"
    if why:
        if required:
            raise SystemExit(f"error: --miss-policy read: {why}")
        print(f"experts: the table kernels are not used ({why}); misses are copied", file=sys.stderr)
        return None
    host = ckpt.expert_store("mmap")  # read once, converted into pinned int4-rows copies (or slots)
    k, n = slots, None if slots is None else (slots * cfg.num_layers if pool == "global" else slots)
    if k is None:
        scratch = rows_scratch_bytes(codec.out_shapes) + codec.slot_layout.nbytes + host.layout.nbytes
        plan = _device_plan(cfg, dtype, codec.slot_layout.nbytes, scratch, device, device_memory, window, chunk,
                            ckpt, pool)
        k, n = plan.k, plan.engine_slots()
    engine = TableEngine(host, codec, n, device, cfg.experts_per_tok, policy=policy, pool=pool)
    where = (f"{n} device slots shared by every layer" if pool == "global" else
             f"{k} of {cfg.num_experts} experts per layer in device slots")
    every = engine.cache.num_slots == cfg.num_layers * cfg.num_experts
    ckpt.codec_note = (f"int4-rows table kernels on cuda (Triton), {where}"
                       + ("" if every else ", misses read in place from pinned RAM"))
    return engine


def _prefetch_budget(guess: bool, misses: MissPolicy, side, ckpt, codec, cfg, device, dtype,
                     host) -> PrefetchBudget | None:
    """On CUDA, the bus time a prefetch may take per layer step, from the calibrated costs (auto's, else measured
    here); None where nothing is prefetched, or on the CPU (no bus: a slot fill is a memcpy on the same cores)."""
    if not guess or device.type != "cuda" or misses.mode == "cpu":
        return None
    costs = misses.costs
    if costs is None:
        side = side or _host_side(ckpt, host, codec, device, dtype)
        costs = calibrate(side, codec, expert_function(codec), cfg.hidden_size, dtype, device)
    budget = PrefetchBudget(costs, host.layout.nbytes)
    print(budget.describe(), file=sys.stderr)
    return budget


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
    if hasattr(ckpt, "expert_store"):  # the quantized store (model/qstore.py)
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
