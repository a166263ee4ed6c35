"""The one planner behind a run and `--dry-run`: what a plan's pieces weigh and where the plan puts them.

    decide(plan, planned)  both below, before anything loads
    sizes(plan, planned)   Sizes: the dense weights on the device, one expert in a slot and in its host home,
                           the codec's scratch; from config.json, manifest.json and safetensors headers (no
                           weight is read), or, for a store not made yet (--dry-run --bits N), from the
                           quantizer's settings (model/qplan.py)
    place(plan, sizes)     Placement: experts resident, cached (every one converted once), or in K slots per
                           layer (--experts-per-layer, --device-memory, or the free CUDA memory at load) of the
                           offload engine or, on CUDA for a store, the table engine (misses read in place from
                           pinned host copies); their host home (--store); one-line errors naming the flag

A run (runtime/load.py) loads what these two decide; `--dry-run` prints them (runtime/dry_run.py). The
sizes are the loader's own: tests/test_dry_run.py checks them against what a loaded model allocates.
Planning for CUDA on a machine without a GPU sizes the kernels as on an Ampere or newer card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from offload import triton_moe
from offload.codec import PlainCodec
from offload.fused import FusedCodec, kernel_layout
from offload.packing import Layout
from offload.prepacked import PrepackedCodec
from offload.quant import HQQCodec, expert_layout
from offload.rows import scratch_bytes as rows_scratch_bytes

from ..model.checkpoint import CheckpointError, expected_shapes, expert_name, shard_map
from ..model.config import DTYPES
from ..model.gguf import is_gguf
from ..model.qplan import default_dense, default_spec, dense_device_bytes, dense_kind
from ..model.qstore import (
    MANIFEST,
    STACK,
    ExpertFormat,
    codec_kind,
    dense_kinds,
    expert_format,
    expert_matrices,
    read_manifest,
    rows_unavailable,
)
from .budget import DevicePlan, choose_slots, dense_bytes
from .flags import READ
from .gguf_sizing import gguf_sizes
from .offloading import ROLES, STACKED_ORDER, scratch_bytes
from .plan import LoadPlan

ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass(frozen=True)
class PlannedStore:
    """--dry-run --bits N [--group-size G]: the store tools/quantize_experts.py would make (default dense)."""

    bits: int
    group_size: int | None = None


@dataclass(frozen=True)
class Sizes:
    source: str  # "checkpoint", "store", "planned store" or "gguf"
    dense: int  # device bytes of every non-expert weight once loaded
    slot: int = 0  # one expert as a device slot (or a resident expert) holds it
    host: int = 0  # one expert in its host home: what crosses the bus per miss
    scratch: int = 0  # codec scratch and device staging beside the slots
    # codec: "plain", "fused", "prepacked", "dequantize", "ggml" (a GGUF's blocks, converted at each load) or
    # "rows" (CUDA table kernels, offload/table.py)
    codec: str = ""
    note: str = ""

    @property
    def store(self) -> bool:
        return self.source != "checkpoint"


@dataclass(frozen=True)
class Placement:
    experts: str  # "none" (dense model), "resident", "cached" (every expert converted once), "offloaded" (the
    # offload engine: misses copied into slots or run on the host) or "table" (misses read in place, CUDA)
    k: int | None = None  # slots per layer; None: from the free CUDA memory once the dense weights are loaded
    store: str | None = None  # the host home of offloaded experts: "ram" or "mmap"
    budget: DevicePlan | None = None  # the --device-memory plan K came from
    pool: str = "layer"  # --expert-pool: "layer" (k per layer) or "global" (engine_slots shared by every layer)

    def engine_slots(self, layers: int) -> int | None:
        """`slots` for the engines: k per layer, or the global pool's N (the budget's, else k x layers)."""
        if self.k is None or self.pool == "layer":
            return self.k
        return self.budget.slots if self.budget is not None else self.k * layers

    def device_slots(self, layers: int) -> int | None:
        """Every slot on the device (None: chosen at load)."""
        n = self.engine_slots(layers)
        return n if n is None or self.pool == "global" else n * layers


def sizes(plan: LoadPlan, planned: PlannedStore | None = None) -> Sizes:
    """What the plan's pieces weigh (see the module docstring)."""
    cfg, device, dtype = plan.config, plan.device, plan.dtype
    is_store = (plan.model_dir / MANIFEST).is_file()
    if planned is not None and is_store:
        raise SystemExit(f"error: --bits: {plan.model_dir} is already a quantized store (drop --bits)")
    probe, note = _probe(device)
    if is_gguf(plan.model_dir):
        if planned is not None:
            raise SystemExit(f"error: --bits: {plan.model_dir} is a GGUF file, already quantized (drop --bits)")
        return Sizes(**gguf_sizes(plan, probe, note))
    if plan.experts.miss_policy == READ and not (device.type == "cuda" and (is_store or planned) and cfg.is_moe):
        raise SystemExit("error: --miss-policy read: needs --device cuda and a quantized store "
                         "(tools/quantize_experts.py)")
    if not is_store and planned is None:
        if not cfg.is_moe:
            return Sizes("checkpoint", dense_bytes(cfg, dtype), note=note)
        return _plain_experts(plan, note)
    if is_store:
        man = read_manifest(plan.model_dir)
        where = plan.model_dir / MANIFEST
        fmt, kinds, source = expert_format(man, cfg, where), dense_kinds(man, where), "store"
    else:
        try:
            spec = default_spec(planned.bits, planned.group_size)
        except ValueError as e:
            raise SystemExit(f"error: --bits {planned.bits} --group-size {planned.group_size}: {e}") from None
        fmt = _planned_format(plan, spec)
        kinds = {n: k for n in expected_shapes(cfg) if (k := dense_kind(n, spec, default_dense())) is not None}
        source = "planned store"
    dense = dense_device_bytes(cfg, kinds, dtype, probe)
    if fmt is None:
        return Sizes(source, dense, note=note)
    why = _table_unavailable(plan, fmt)
    if why is None:
        return _table_experts(fmt, source, dense, note)
    return _store_experts(fmt, source, dense, device, probe, dtype, note)


def _table_unavailable(plan: LoadPlan, fmt: ExpertFormat) -> str | None:
    """Why the CUDA table engine (offload/table.py) will not serve these experts, decided as
    runtime/offloading.table_engine decides it (None: it will). --miss-policy read without it is an error."""
    e = plan.experts
    if plan.device.type != "cuda" or e.miss_policy not in (None, READ):
        return "not on CUDA, or another --miss-policy"
    cfg = plan.config
    why = triton_moe.self_check(plan.device) if torch.cuda.is_available() else None
    why = why or triton_moe.shape_unsupported(cfg.hidden_size, cfg.intermediate_size, fmt.spec.group_size)
    why = why or rows_unavailable(fmt.matrices, fmt.spec, fmt.cpu_layout)
    if why is None and e.store == "mmap":
        why = "--store mmap: the kernels read missed experts from pinned RAM (the converted copies)"
    if why and e.miss_policy == READ:
        raise SystemExit(f"error: --miss-policy read: {why}")
    return why


def _table_experts(fmt: ExpertFormat, source: str, dense: int, note: str) -> Sizes:
    """Experts in the int4-rows layout: in K device slots, the others as pinned host copies read in place."""
    codec = (PrepackedCodec(fmt.matrices, fmt.spec, "cpu", STACK, fmt.cpu_layout, rows=True) if fmt.cpu_layout
             else FusedCodec(fmt.matrices, fmt.spec, "cpu", stack=STACK, rows=True))  # the layout is every device's
    slot = codec.slot_layout.nbytes
    scratch = rows_scratch_bytes(codec.out_shapes) + slot + fmt.layout.nbytes  # as offloading.table_engine plans
    return Sizes(source, dense, slot, slot, scratch, "rows", note)


def _probe(device: torch.device) -> tuple[torch.device, str]:
    """The device whose kernels decide the codecs: the plan's, or this CPU's when the plan's GPU is not here."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu"), "no GPU here: kernels sized as on an Ampere or newer card"
    return device, ""


def _planned_format(plan: LoadPlan, spec) -> ExpertFormat | None:
    if not plan.config.is_moe:
        return None
    matrices = expert_matrices(plan.config)
    try:
        layout = expert_layout(matrices, spec)
    except ValueError as e:
        raise SystemExit(f"error: --bits {spec.bits} --group-size {spec.group_size}: {e}") from None
    return ExpertFormat(matrices, spec, "hqq", None, layout)


def _plain_experts(plan: LoadPlan, note: str) -> Sizes:
    """A Hugging Face checkpoint: experts in the file's dtype at home, PlainCodec's layout in a slot."""
    cfg, device, dtype = plan.config, plan.device, plan.dtype
    i, d = cfg.intermediate_size, cfg.hidden_size
    shapes = {"w1": (i, d), "w2": (d, i), "w3": (i, d)}
    home = _file_dtype(plan)
    layout = Layout.plan([(w, home, shapes[w]) for w in STACKED_ORDER])
    # on CUDA the codec's scratch is sized on the meta device: a plan allocates nothing
    codec = PlainCodec(layout, ROLES, dtype, "cpu" if device.type == "cpu" else "meta", stack={"w13": ("w1", "w3")})
    return Sizes("checkpoint", dense_bytes(cfg, dtype), codec.slot_layout.nbytes, layout.nbytes,
                 scratch_bytes(codec, SimpleNamespace(layout=layout), device), "plain", note)


def _file_dtype(plan: LoadPlan) -> torch.dtype:
    """The experts' dtype in the checkpoint's files (their header), else config.json's torch_dtype."""
    name = expert_name(0, 0, "w1")
    try:
        file = shard_map(plan.model_dir).get(name)
    except CheckpointError:
        file = None  # config.json alone: planning before the download
    if file is not None and Path(file).is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                tag = f.get_slice(name).get_dtype()
            if tag in ST_DTYPES:
                return ST_DTYPES[tag]
        except Exception:  # noqa: BLE001 - a broken file is the loader's to report, naming it
            pass
    return DTYPES[plan.config.dtype]


def _store_experts(fmt: ExpertFormat, source: str, dense: int, device: torch.device, probe: torch.device,
                   dtype: torch.dtype, note: str) -> Sizes:
    """A store's experts: the packed bytes at home, the codec QStore.codec would choose in a slot."""
    kind, why = codec_kind(fmt.matrices, fmt.spec, fmt.cpu_layout, probe)
    if kind == "dequantize":  # scratch sized on the meta device: a plan allocates nothing
        codec = HQQCodec(fmt.matrices, fmt.spec, "meta", dtype)
        slot, scratch = codec.layout, codec.scratch_bytes()
        note = "; ".join(filter(None, [note, f"experts dequantized at every use ({why})"]))
    elif kind == "fused":
        codec = FusedCodec(fmt.matrices, fmt.spec, probe, stack=STACK)
        slot, scratch = kernel_layout(codec.names, codec.out_shapes, fmt.spec.group_size, device), codec.scratch_bytes()
    else:
        codec = PrepackedCodec(fmt.matrices, fmt.spec, probe, STACK, fmt.cpu_layout)
        slot = kernel_layout(codec.names, codec.out_shapes, codec.group, device)
        # PrepackedCodec.scratch_bytes for `device`: conversion codes unless the slot reads the stored layout
        scratch = 0 if slot == codec.layout else max(n * k for n, k in codec.out_shapes.values())
    stand_in = SimpleNamespace(scratch_bytes=lambda: scratch, slot_layout=slot, layout=fmt.layout)
    scratch = scratch_bytes(stand_in, SimpleNamespace(layout=fmt.layout), device)
    return Sizes(source, dense, slot.nbytes, fmt.layout.nbytes, scratch, kind, note)


def decide(plan: LoadPlan, planned: PlannedStore | None = None) -> tuple[Sizes, Placement]:
    """sizes, then place: what a run and --dry-run both call once the plan is made, before anything loads."""
    sz = sizes(plan, planned)
    return sz, place(plan, sz)


def place(plan: LoadPlan, sz: Sizes) -> Placement:
    """Where the experts go (see the module docstring); K from --device-memory is printed, as the run does."""
    cfg, e, cuda = plan.config, plan.experts, plan.device.type == "cuda"
    if not cfg.is_moe:
        return Placement("none")
    n, k, home = cfg.num_experts, e.per_layer, e.store or "ram"
    budget = None
    if e.device_memory is not None:
        budget = choose_slots(cfg, plan.dtype, sz.slot, window=plan.window, chunk=plan.chunk, device=plan.device,
                              scratch=sz.scratch, gib=e.device_memory, dense=sz.dense, pool=e.expert_pool)
        k = budget.k
    if sz.codec == "rows":  # no host copies when every expert has its slot
        return Placement("table", k, home if k is None or k < n else None, budget, e.expert_pool)
    cacheable = sz.store and sz.codec in ("fused", "prepacked", "ggml")
    if not sz.store and k in (None, n) and e.store is None and budget is None:
        return Placement("resident", n)
    if cacheable and (k == n or (k is None and not cuda)):
        return Placement("cached", n, "mmap")  # read once through the mapping, held in the kernel's layout
    if k is None and cuda:
        return Placement("offloaded", None, home, pool=e.expert_pool)  # from the free memory, once the dense load
    return Placement("offloaded", k or n, home, budget, e.expert_pool)
