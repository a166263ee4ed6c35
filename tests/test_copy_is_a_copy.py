"""Issue 22's CPU-checkable goals over the fake CUDA backend (tests/fake_cuda.py), 4-bit stores:

  * a copy moves exactly the slot's bytes and runs no conversion kernel: every op the copy stream runs on
    expert bytes is one `copy_` of one whole slot, and the engines count the bytes the copies moved;
  * hits on the device plus misses on the host equal all copies, bitwise, for every miss policy, K and
    ram/mmap store.

The fake attributes each op to the stream it was queued on and checks their order as a GPU would.
"""

from __future__ import annotations

import pytest
import torch
from fake_cuda import FakeCuda
from test_fused import PROMPTS, qe
from test_offload_model import greedy_logits
from test_table_engine import DENSE, EmulatedMoE

from mixtral_lite.model.qstore import STACK, open_store
from mixtral_lite.runtime import offloading
from mixtral_lite.runtime.load import load_model
from offload.fused import FusedCodec
from offload.miss_policy import Costs, MissPolicy
from offload.quant import QuantSpec
from offload.table import TableEngine
from offload.transfer import CudaTransfer


class OpLog(FakeCuda):
    """Also keeps every access to a tracked buffer: (actor, tick, op, region, lo, hi, write); `order`: check
    the stream order too (False: only log)."""

    def __init__(self, order: bool = True):
        super().__init__()
        self.log: list[tuple] = []
        self.order = order

    def access(self, region, lo, hi, write, actor, tick, what):
        self.log.append((actor, tick, what.split(".")[0], region.name, lo, hi, write))  # copy_.default: copy_
        if self.order:
            super().access(region, lo, hi, write, actor, tick, what)

    def ops_on(self, stream) -> dict[tuple, list[tuple]]:
        """The ops `stream` ran: (actor, tick) -> their accesses (op, region, lo, hi, write)."""
        ops: dict[tuple, list[tuple]] = {}
        for actor, tick, *rest in self.log:
            if actor == stream.name:
                ops.setdefault((actor, tick), []).append(tuple(rest))
        return ops

    def region_of(self, t: torch.Tensor) -> str:
        return self.regions[t.untyped_storage().data_ptr()].name


@pytest.fixture(scope="module")
def stores(mixtral_q_ref, tmp_path_factory):
    """hqq-layout and prepacked 4-bit stores; g32 with 8-bit scale/zero: the stored expert (14592 bytes) is
    smaller than the slot that holds it in a kernel layout (15360), so a byte count can tell them apart."""
    _, src = mixtral_q_ref
    root, spec = tmp_path_factory.mktemp("copies"), QuantSpec(4, 32, 1, 8)
    return {"hqq": qe.convert(src, root / "hqq", spec, DENSE, progress=False),
            "prepacked": qe.convert(src, root / "pre", spec, DENSE, progress=False, prepack=True)}


def test_table_engine_copies_are_one_plain_copy_of_one_slot(stores):
    """The CUDA default (--miss-policy read): experts are converted once at load into pinned host copies in
    the slot layout; an admission is then one copy_ of exactly one slot, and nothing else on the copy stream.
    Only logged, not order-checked: a kernel reaches a slot through the table entry the copy stream writes
    right after the copy (offload/table.py), a data dependency the fake does not model."""
    fake, s = OpLog(order=False), open_store(stores["hqq"])
    codec = FusedCodec(s.matrices, s.spec, "cpu", STACK, rows=True)
    assert codec.layout.nbytes != codec.slot_layout.nbytes  # the stored form is not what a slot holds
    with fake.checking():
        eng = TableEngine(s.expert_store("ram"), codec, 2, "cpu", top_k=2, moe=EmulatedMoE(codec), backend=fake)
        slot_bytes = codec.slot_layout.nbytes
        slots = {b.storage_offset(): key for key, b in enumerate(eng.cache.buffers())}
        anchor = eng.cache.buffer(0)  # the slot pool's storage, tracked while this view lives
        pool = fake.track(anchor).name
        eng.moe.register(*eng.cache.buffers())
        for layer in range(eng.layers):
            eng.moe.register(*eng.host[layer])
        fake.log.clear()  # what loading did (the conversion into the host copies) is not a copy
        x, w = torch.randn(1, 64).to(torch.bfloat16), torch.tensor([[0.6, 0.4]])
        for pair in ([0, 1], [2, 3], [0, 1], [0, 2], [1, 3], [2, 3], [3, 0]) * 2:
            eng.poll()
            ids = torch.tensor([pair])
            h = x.clone()
            for layer in range(eng.layers):
                h = eng.run_device(layer, h, ids, w, h, torch.empty_like(h)).clone()
            eng.end_step(1)
        eng.poll()
    ops = fake.ops_on(eng.copy_stream)
    assert eng.counters["copies"] > eng.layers and len(ops) == eng.counters["copies"]
    for accesses in ops.values():
        assert [a[0] for a in accesses] == ["copy_", "copy_"]  # one op: reads its source, writes its slot
        (_, src, slo, shi, _), (_, dst, lo, hi, _) = sorted(accesses, key=lambda a: a[4])
        assert dst == pool and lo in slots and hi - lo == slot_bytes  # exactly one whole slot
        assert src != pool and shi - slo == slot_bytes  # from a host copy of exactly that size
    assert eng.counters["bytes_copied"] == eng.counters["copies"] * slot_bytes
    del anchor


@pytest.mark.parametrize("store", ["ram", "mmap"])
def test_a_miss_from_a_store_in_the_slot_layout_is_a_plain_copy(stores, store):
    """The copying engine (--miss-policy copy): where the store holds what a slot holds (--prepack, read on
    this CPU), each miss is copy_ ops filling exactly one slot, once, and no conversion runs."""
    fake = OpLog()
    transfer = []

    def make(n, nbytes):
        transfer.append(CudaTransfer(torch.device("cpu"), n, nbytes, fake))
        return transfer[0]
    with fake.checking():
        model = load_model(stores["prepacked"], dtype=torch.bfloat16,
                           experts=offloading.make_factory(slots=2, store=store, miss_policy="copy", transfer=make))
        eng = model.experts.engine
        slot_bytes = eng.cache.buffer(0).numel()
        assert eng.store.layout.nbytes == slot_bytes
        greedy_logits(model, PROMPTS[0], 6)
    ops = fake.ops_on(transfer[0].stream)
    pool = fake.region_of(eng.cache.buffer(0))
    into_slots: dict[int, int] = {}
    for accesses in ops.values():
        assert {a[0] for a in accesses} == {"copy_"}, accesses  # nothing but copies on the copy stream
        for _, region, lo, hi, write in accesses:
            if write:
                assert region == pool and lo // slot_bytes == (hi - 1) // slot_bytes  # inside one slot
                into_slots[lo // slot_bytes] = into_slots.get(lo // slot_bytes, 0) + hi - lo
    s = model.experts.stats()
    loads = s["expert_copies"] + s.get("prefetch_issued", 0)
    assert loads > 0 and sum(into_slots.values()) == loads * slot_bytes == s["bytes_host_to_device"]
    assert all(n % slot_bytes == 0 for n in into_slots.values())  # every load filled its whole slot


def policies() -> dict:
    return {"copy": "copy", "cpu": "cpu",
            "mix": MissPolicy("auto", script=lambda step, hits, misses: step % (misses + 1)),
            "auto-slow-pcie": MissPolicy("auto", Costs(copy=20e-3, cpu=2e-3, gpu=0.3e-3)),
            "auto-by-choice": MissPolicy("auto", Costs(3.76e-3, 1.32e-3, 0.31e-3, cpu_beside_copy=2.03e-3))}


@pytest.mark.parametrize("kind", ["hqq", "prepacked"])
@pytest.mark.parametrize("store", ["ram", "mmap"])
@pytest.mark.parametrize("k", [2, 3])
def test_hits_on_the_device_plus_misses_on_the_host_equal_all_copies(stores, kind, store, k):
    """Every miss policy (copy = all copies, the reference), K, ram/mmap, hqq and prepacked 4-bit stores,
    over the checking fake: the same greedy tokens and bitwise the same logits."""
    want = None
    for name, policy in policies().items():
        fake = FakeCuda()
        with fake.checking():
            factory = offloading.make_factory(
                slots=k, store=store, miss_policy=policy,
                transfer=lambda n, nbytes, f=fake: CudaTransfer(torch.device("cpu"), n, nbytes, f))
            model = load_model(stores[kind], dtype=torch.bfloat16, experts=factory)
            got = greedy_logits(model, PROMPTS[0], 16)
        s = model.experts.stats()
        assert fake.accesses > 0
        if name == "cpu":  # no prefetch for misses that run on the host, and a host run admits nothing
            assert s["expert_hits"] == s["prefetch_issued"] == 0
        else:
            assert s["expert_hits"] + s["prefetch_used"] > 0  # some uses served from a device slot
        assert s["expert_misses"] == s["expert_copies"] + s["cpu_expert_runs"]
        if name == "copy":
            want = got
            assert s["cpu_expert_runs"] == 0
        else:
            assert got[0] == want[0] and torch.equal(got[1], want[1]), name
            if name in ("cpu", "mix", "auto-slow-pcie"):
                assert s["cpu_expert_runs"] > 0, name
