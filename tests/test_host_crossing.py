"""Host experts beside a GPU: their rows and results cross through offload/host_crossing.py, checked on the
CPU by tests/fake_cuda.py (every read after its write, every rewrite after its reads), bitwise equal."""

from __future__ import annotations

import pytest
import torch
from fake_cuda import FakeCuda, OrderViolation
from test_hybrid import ckpt, policies  # noqa: F401  (ckpt: the fixture)
from test_offload_engine import DIM, INTER, E, L, steps
from test_offload_synth import make_engine, reference

from offload.host_crossing import HostCrossing
from offload.transfer import CudaTransfer


def build(files, policy, fake, store):
    return make_engine(files, L, E, INTER, DIM, slots=2, store=store, prefetch=True, miss_policy=policy,
                       transfer=lambda n, nbytes: CudaTransfer(torch.device("cpu"), n, nbytes, fake),
                       pinner=lambda n: torch.empty(n, dtype=torch.uint8))


def drive(engine, tensors, run_steps, staged: bool):
    """As the model's provider calls it (stage_rows before the ids' sync) or the engine alone."""
    for per_layer in run_steps:
        for layer, (x, ids, w) in enumerate(per_layer):
            nxt = per_layer[layer + 1][1] if layer + 1 < L else None
            if staged:
                engine.stage_rows(x)
            got = engine.run(layer, x, ids, w, nxt)
            assert torch.equal(got, reference(tensors, layer, x, ids, w)), (layer, ids)


def scenario():
    """Decode steps, prefill chunks (more rows: the buffers grow), decode again."""
    return steps(7, 2, 1, 5) + steps(8, 2, 4, 2) + steps(9, 2, 1, 3)


class LoggingFake(FakeCuda):
    """Also notes who read and wrote each tracked buffer."""

    def __init__(self):
        super().__init__()
        self.log: set[tuple[str, str, bool]] = set()

    def access(self, region, lo, hi, write, actor, tick, what):
        self.log.add((region.name, actor, write))
        super().access(region, lo, hi, write, actor, tick, what)


def region_name(fake, t: torch.Tensor) -> str:
    return fake.regions[t.untyped_storage().data_ptr()].name


@pytest.mark.parametrize("store", ["ram", "mmap"])
@pytest.mark.parametrize("staged", [True, False])
@pytest.mark.parametrize("name", ["cpu", "mix"])
def test_host_experts_beside_the_fake_gpu_are_ordered_and_equal(ckpt, store, staged, name):  # noqa: F811
    tensors, files = ckpt
    fake = LoggingFake()
    with fake.checking():
        engine = build(files, policies()[name], fake, store)
        assert engine._crossing is not None
        drive(engine, tensors, scenario(), staged)
        s = engine.stats()
        assert s["cpu_expert_runs"] > 0 and s["expert_misses"] == s["expert_copies"] + s["cpu_expert_runs"]
        c = engine._crossing
        rows, block, dev = (region_name(fake, t) for t in (c._rows, c._block, c._device_block))
        # rows: written by the compute stream, read by the host; results: the other way, into the device block
        assert {(rows, "compute", True), (rows, "host", False), (block, "host", True), (block, "compute", False),
                (dev, "compute", True), (dev, "compute", False)} <= fake.log
        engine.close()


class NoRowsWait(HostCrossing):
    def rows(self, staged):
        return staged


class RowsWaitAfterSend(HostCrossing):
    """Waits for the rows only once the results are sent: the host reads them, and rewrites the results
    block, before it knows the device is done with either."""

    def rows(self, staged):
        return staged

    def send(self, ys):
        out = super().send(ys)
        self.rows_copied.synchronize()
        return out


@pytest.mark.parametrize("mutant", [NoRowsWait, RowsWaitAfterSend])
@pytest.mark.parametrize("staged", [True, False])
def test_checker_catches_a_missing_wait_or_record(ckpt, mutant, staged):  # noqa: F811
    tensors, files = ckpt
    fake = FakeCuda()
    with pytest.raises(OrderViolation), fake.checking():
        engine = build(files, policies()["cpu"], fake, "mmap")
        engine._crossing.__class__ = mutant
        drive(engine, tensors, scenario(), staged)


def test_cpu_device_has_no_crossing(ckpt):  # noqa: F811
    """On the CPU device the host experts read x itself: nothing is staged, nothing crosses."""
    tensors, files = ckpt
    engine = make_engine(files, L, E, INTER, DIM, slots=2, miss_policy=policies()["cpu"])
    assert engine._crossing is None
    engine.stage_rows(torch.randn(1, DIM))
    assert engine._staged is None
