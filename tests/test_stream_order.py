"""CudaTransfer's stream/event ordering, checked on the CPU by tests/fake_cuda.py.

The real transfer over the fake passes (prefill in waves, decode with prefetch, ram and mmap
stores, converting loads); every mutant that removes or moves one wait or record is caught.
`pytest --fake-cuda tests/test_offload_engine.py tests/test_offload_model.py tests/test_quant_store.py
tests/test_hybrid.py tests/test_hybrid_model.py` runs those suites over the fake as well.
"""

from __future__ import annotations

import gc
import random

import pytest
import torch
from fake_cuda import FakeCuda, OrderViolation
from test_offload_synth import make_engine, make_experts, reference, write_checkpoint

from offload.transfer import CudaTransfer

L, E, INTER, DIM = 3, 6, 32, 16


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """fp32 experts (slots hold the stored bytes) and bf16 ones (fp32 compute: converting loads)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        tensors = make_experts(L, E, INTER, DIM, dtype)
        out[dtype] = tensors, write_checkpoint(tmp_path_factory.mktemp(str(dtype)), tensors, shards=2)
    return out


def scenario(engine, tensors, seed: int = 0):
    """Prefill chunks needing every expert (waves through 2 slots), then decode steps with prefetch."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    plan = [[[[t % E, (t + 3) % E] for t in range(8)]] * L]  # prefill: all E experts per layer
    plan += [[[rng.sample(range(E), 2)] for _ in range(L)] for _ in range(8)]  # decode
    for per_layer in plan:
        for layer, ids in enumerate(per_layer):
            x = torch.randn(len(ids), DIM, generator=g)
            w = torch.softmax(torch.randn(len(ids), 2, generator=g), -1)
            guess = [rng.sample(range(E), 2) for _ in ids] if layer + 1 < L else None
            got = engine.run(layer, x, ids, w, guess)
            want = reference({k: v.float() for k, v in tensors.items()}, layer, x, ids, w)
            assert torch.equal(got, want)


def build(ckpts, dtype, store, fake, cls=CudaTransfer):
    tensors, files = ckpts[dtype]
    engine = make_engine(files, L, E, INTER, DIM, slots=2, store=store, prefetch=True,
                         transfer=lambda n, nbytes: cls(torch.device("cpu"), n, nbytes, fake),
                         pinner=lambda n: torch.empty(n, dtype=torch.uint8))  # ram: the pinned, direct path
    assert engine.store.pinned == (store == "ram")
    return engine, tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("store", ["ram", "mmap"])
def test_real_transfer_is_ordered(ckpts, dtype, store):
    fake = FakeCuda()
    with fake.checking():
        engine, tensors = build(ckpts, dtype, store, fake)
        scenario(engine, tensors)
        assert engine.stats()["prefetch_issued"] > 0
        del engine
        gc.collect()
    assert fake.accesses > 100  # the checker saw the slots and staging buffers


def mutant(name: str, **steps) -> type:
    return type(f"CudaTransfer_{name}", (CudaTransfer,), steps)


def _noop(*args) -> None:
    pass


def _ready_early(self, key):  # record `ready` before the copy is enqueued
    self.stream.wait_event(self.free[key])
    self.ready[key].record(self.stream)


def _free_early(self, compute, key):  # record `free` before compute reads the slot
    compute.wait_event(self.ready[key])
    self.free[key].record(compute)


def _staged_early(self, i):  # record `staged` before the copy out of the buffer is enqueued
    self.staged[i].synchronize()
    self.staged[i].record(self.stream)


MUTANTS = {
    "no wait on free": (mutant("no_free_wait", _await_free=_noop), "ram"),
    "no record of ready": (mutant("no_ready_record", _mark_ready=_noop), "ram"),
    "no wait on ready": (mutant("no_ready_wait", _await_ready=_noop), "ram"),
    "no record of free": (mutant("no_free_record", _mark_free=_noop), "ram"),
    "no wait for staging": (mutant("no_claim", _claim_staging=_noop), "mmap"),
    "no record of staged": (mutant("no_staged", _mark_staged=_noop), "mmap"),
    "ready before the copy": (mutant("ready_early", _await_free=_ready_early, _mark_ready=_noop), "ram"),
    "free before the read": (mutant("free_early", _await_ready=_free_early, _mark_free=_noop), "ram"),
    "staged before the copy": (mutant("staged_early", _claim_staging=_staged_early, _mark_staged=_noop), "mmap"),
    # compute does not wait for the copy thread: the fake runs a job only when it is joined, so the slot is
    # stale; the checker cannot know what a read should have seen, the scenario's equality assert does
    "no join of the copy job": (mutant("no_join", _join=_noop), "mmap"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MUTANTS))
def test_checker_catches_mutant(ckpts, name, dtype):
    cls, store = MUTANTS[name]
    fake = FakeCuda()
    with pytest.raises(AssertionError if "join" in name else OrderViolation), fake.checking():
        engine, tensors = build(ckpts, dtype, store, fake, cls)
        scenario(engine, tensors)


def _track_only(self, tensor):
    self.cuda.track(tensor)  # checked, but never record_stream'd on the copy stream


@pytest.mark.parametrize("close", [False, True])
def test_pool_freed_under_landing_copies(ckpts, close):
    """Without record_stream, dropping an engine with prefetches in flight is caught, unless close() waited."""
    fake = FakeCuda()
    cls = mutant("no_adopt", adopt=_track_only)

    def run():
        with fake.checking():
            engine, tensors = build(ckpts, torch.float32, "ram", fake, cls)
            scenario(engine, tensors)
            if close:
                engine.close()
            del engine
            gc.collect()

    if close:
        run()
    else:
        with pytest.raises(OrderViolation, match="freed while"):
            run()


@pytest.mark.parametrize("store", ["ram", "mmap"])
def test_staging_pinned_only_for_pageable_loads_and_timing_only_after_loads(ckpts, store):
    fake = FakeCuda()
    with fake.checking():
        engine, tensors = build(ckpts, torch.float32, store, fake)
        scenario(engine, tensors)
        t = engine.transfer
        assert len(t.staging) == (0 if store == "ram" else CudaTransfer.STAGING)  # 2 x 512 MiB saved on ram
        loads = sum(engine.counters.loads.values())
        assert 0 < len(t._timing) <= loads  # one timing pair per load compute waited on, none per hit
        before = len(t._timing)
        x, w = torch.randn(1, DIM), torch.ones(1, 2) / 2
        for _ in range(3):  # the same experts again: hits on settled slots, no timing events
            engine.run(0, x, [[0, 3]], w)
        assert len(t._timing) == before + sum(engine.counters.loads.values()) - loads


@pytest.mark.slow
def test_offload_suites_pass_under_the_fake():
    """The engine, offloaded-model, quantized-store and hybrid tests with every transfer over the checking fake."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    suites = ["tests/test_offload_engine.py", "tests/test_offload_model.py", "tests/test_quant_store.py",
              "tests/test_pool_engine.py",
              "tests/test_hybrid.py", "tests/test_hybrid_model.py"]  # every miss policy, K, ram/mmap
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--fake-cuda", *suites],
                         cwd=root, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


class ThreadedFake(FakeCuda):
    """The fake's streams and events, but jobs on a real thread (as TorchCuda runs them); no checking."""

    def submit(self, fn):
        from concurrent.futures import ThreadPoolExecutor

        if not hasattr(self, "_pool"):
            self._pool = ThreadPoolExecutor(1)
        return self._pool.submit(fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_thread_for_real(ckpts, dtype):
    """mmap loads on a real second thread, the engine built under inference mode (the slots are then
    inference tensors, which the copy thread may write only in inference mode too): same numbers."""
    fake = ThreadedFake()
    with torch.inference_mode():
        engine, tensors = build(ckpts, dtype, "mmap", fake)
        scenario(engine, tensors)
        engine.close()
    assert not engine.transfer._jobs and engine.transfer.host_copy_s > 0
