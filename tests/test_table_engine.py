"""The address-table engine (offload/table.py): every expert readable through the table at every step, the
cache's admissions and evictions applied one step late without changing any output, and the counters.

The CUDA kernels (offload/triton_moe.py) are replaced on the CPU by `EmulatedMoE`, which follows the
table's addresses back to the buffers they name and computes the kernels' arithmetic with torch; where
Triton is installed, the real kernels also run here under its interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fused import qe

from mixtral_lite.model.qstore import STACK, DenseSettings, open_store
from offload.fused import FusedCodec
from offload.packing import views
from offload.quant import QuantSpec
from offload.table import TableEngine

DENSE = DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8)
ROOT = Path(__file__).resolve().parents[1]


class EmulatedMoE:
    """TableMoE's arithmetic in torch, each expert found by following its table address."""

    def __init__(self, codec):
        self.codec, self.buffers = codec, {}
        self.layout = codec.slot_layout

    def register(self, *tensors):
        for t in tensors:
            self.buffers[t.data_ptr()] = t

    def __call__(self, x, ids, weights, table, e_base, h, out, residual=None):
        acc = torch.zeros_like(out, dtype=torch.bfloat16)
        for t in range(x.shape[0]):
            for a in range(ids.shape[1]):
                buf = self.buffers[int(table[e_base + int(ids[t, a])])]
                w13, w2 = self.codec.decode(views(buf, self.layout))
                gate, up = (x[t : t + 1].float() @ w13.dequantize().float().t()).to(torch.bfloat16).chunk(2, -1)
                y = (torch.nn.functional.silu(gate) * up).float() @ w2.dequantize().float().t()
                acc[t] += (weights[t, a] * y[0].to(torch.bfloat16).float()).to(torch.bfloat16)
        out.copy_(acc if residual is None else (residual.float() + acc.float()).to(torch.bfloat16))
        return out


@pytest.fixture(scope="module")
def store(mixtral_q_ref, tmp_path_factory):
    _, src = mixtral_q_ref
    return qe.convert(src, tmp_path_factory.mktemp("table") / "q4", QuantSpec(4, 64, 1, 8), DENSE, progress=False)


def engine(path, slots: int, pool: str = "layer") -> TableEngine:
    s = open_store(path)
    codec = FusedCodec(s.matrices, s.spec, "cpu", STACK, rows=True)
    moe = EmulatedMoE(codec)
    eng = TableEngine(s.expert_store("ram"), codec, slots, "cpu", top_k=2, moe=moe, pool=pool)
    moe.register(*eng.cache.buffers())
    for layer in range(eng.layers):
        if eng.host is not None:
            moe.register(*eng.host[layer])
    return eng


def routes(layers: int, experts: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(layers)]) for _ in range(steps)]


def decode(eng: TableEngine, steps: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    w = torch.tensor([[0.6, 0.4]])
    outs = []
    for ids in steps:
        eng.poll()
        h = x.clone()
        for layer in range(eng.layers):
            h = eng.run_device(layer, h, ids[layer : layer + 1], w, h, torch.empty_like(h)).clone()
        eng.end_step(1)
        outs.append(h)
    eng.poll()
    return outs


def _where(eng: TableEngine, layer: int, e: int) -> str:
    addr = int(eng.table[layer * eng.num_experts + e])
    slots = {b.data_ptr(): k for k, b in enumerate(eng.cache.buffers())}
    return f"slot {slots[addr]}" if addr in slots else "host"


def test_offloaded_steps_equal_resident_steps_and_the_table_always_names_the_right_bytes(store):
    resident, offloaded = engine(store, 4), engine(store, 2)
    assert resident.host is None and offloaded.host is not None
    steps = routes(resident.layers, 4, 12)
    x = torch.randn(1, 64).to(torch.bfloat16)
    want, got = decode(resident, steps, x), decode(offloaded, steps, x)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    for layer in range(offloaded.layers):  # each table entry holds its own expert's bytes
        for e in range(offloaded.num_experts):
            addr = int(offloaded.table[layer * offloaded.num_experts + e])
            assert torch.equal(offloaded.moe.buffers[addr], offloaded.host[layer][e])
    s = offloaded.stats()
    assert s["expert_hits"] + s["expert_misses"] == 12 * offloaded.layers * 2
    assert s["expert_copies"] > 0 and s["bytes_copied"] == s["expert_copies"] * offloaded.layout.nbytes
    assert resident.stats()["hit_rate"] == 1.0


def test_one_pool_for_every_layer_equals_resident_steps_and_counts_bytes_by_kind(store):
    """The table engine over a global pool with a spare slot: the kernels still find (layer, expert) through the
    table, outputs equal the resident engine's, admissions may evict another layer's expert, and the figures
    split the bus bytes into misses read in place and admissions."""
    resident = engine(store, 4)
    pooled = engine(store, 2 * resident.layers + 1, "global")
    assert pooled.cache.kind == "global" and pooled.host is not None
    steps = routes(resident.layers, 4, 12, seed=3)
    x = torch.randn(1, 64).to(torch.bfloat16)
    for a, b in zip(decode(resident, steps, x), decode(pooled, steps, x), strict=True):
        assert torch.equal(a, b)
    for layer in range(pooled.layers):
        for e in range(pooled.num_experts):
            addr = int(pooled.table[layer * pooled.num_experts + e])
            assert torch.equal(pooled.moe.buffers[addr], pooled.host[layer][e])
    s = pooled.stats()
    nbytes = pooled.store.layout.nbytes
    assert s["expert_pool"] == "global" and s["pool_slots"] == 2 * pooled.layers + 1
    assert s["expert_uses"] == s["expert_hits"] + s["expert_misses"] == 12 * pooled.layers * 2
    assert s["read_in_place_bytes"] == s["expert_misses"] * nbytes and s["prefetch_used"] == 0
    assert s["admitted_bytes"] == s["expert_copies"] * nbytes == s["bytes_copied"] and s["demand_miss_bytes"] == 0
    assert s["read_in_place_bytes_per_token"] == s["read_in_place_bytes"] / 12


def test_admissions_take_free_slots_then_only_experts_used_more_than_the_victim(store):
    eng = engine(store, 2)
    step = {name: torch.tensor([pair] * eng.layers) for name, pair in (("01", [0, 1]), ("23", [2, 3]),
                                                                       ("02", [0, 2]))}
    x = torch.randn(1, 64).to(torch.bfloat16)
    decode(eng, [step["01"]], x)  # free slots: admitted after the step, the table follows the copy
    assert {_where(eng, 0, e) for e in (0, 1)} == {"slot 0", "slot 1"}
    decode(eng, [step["23"]], x)  # used once, like 0 and 1: not worth a copy; read in place
    assert _where(eng, 0, 2) == _where(eng, 0, 3) == "host" and "slot" in _where(eng, 0, 0)
    assert eng.stats()["expert_copies"] == 2 * eng.layers
    decode(eng, [step["23"]], x)  # now used twice: they evict 0 and 1
    assert "slot" in _where(eng, 0, 2) and "slot" in _where(eng, 0, 3) and _where(eng, 0, 0) == "host"
    before = eng.stats()["expert_misses"]
    decode(eng, [step["02"]], x)  # 0 is read in place, 2 is a hit
    assert eng.stats()["expert_misses"] - before == eng.layers
    assert eng.stats()["expert_copies"] == 4 * eng.layers


def test_prefill_admits_and_equals_the_resident_engine(store):
    resident, offloaded = engine(store, 4), engine(store, 2)
    rows = TableEngine.KERNEL_ROWS + 4  # more rows than the decoding kernels take: the prefill path
    x = torch.randn(rows, 64).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(rows)])
    w = torch.rand(rows, 2)
    a, b = resident.run(0, x, ids, w), offloaded.run(0, x, ids, w)
    assert torch.equal(a, b)
    assert offloaded.stats()["expert_copies"] >= 2


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0,
                    reason="triton is not installed (the kernels are CUDA's; this runs them in its interpreter)")
def test_the_triton_kernels_pass_their_self_check_in_the_interpreter():
    code = "import torch; from offload import triton_moe as t; print(t.self_check(torch.device('cpu')))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "None", r.stdout + r.stderr[-2000:]
