"""The miss cost model's decisions on injected costs: all-copy, all-CPU, a split in between."""

from __future__ import annotations

import pytest

from offload.miss_policy import Costs, MissPolicy, layer_time, split


def test_fast_pcie_copies_every_miss():
    c = Costs(copy=0.5e-3, cpu=5e-3, gpu=0.3e-3)
    assert split(hits=1, misses=1, c=c) == 1
    assert split(hits=0, misses=8, c=c) == 8


def test_slow_pcie_runs_every_miss_on_the_cpu():
    c = Costs(copy=20e-3, cpu=2e-3, gpu=0.3e-3)
    assert split(hits=0, misses=2, c=c) == 0
    assert split(hits=1, misses=1, c=c) == 0


def test_comparable_costs_split_the_misses():
    c = Costs(copy=4e-3, cpu=4e-3, gpu=0.3e-3)
    copies = split(hits=0, misses=8, c=c)
    assert 0 < copies < 8
    # the split is the soonest of every choice
    assert all(layer_time(0, 8, copies, c) <= layer_time(0, 8, n, c) + 1e-12 for n in range(9))


def test_ties_keep_the_copy():
    c = Costs(copy=2e-3, cpu=2e-3, gpu=0.0)
    assert split(hits=0, misses=1, c=c) == 1


def test_policies_and_script():
    c = Costs(copy=20e-3, cpu=2e-3, gpu=0.3e-3)
    assert MissPolicy("copy").copies(1, 3) == 3
    assert MissPolicy("cpu").copies(1, 3) == 0
    assert MissPolicy("auto", c).copies(0, 2) == 0
    assert MissPolicy("cpu").copies(2, 0) == 0
    scripted = MissPolicy("auto", script=lambda step, h, m: step % 3)
    assert [scripted.copies(0, 2) for _ in range(4)] == [0, 1, 2, 0]
    assert "copy" in MissPolicy("auto", c).describe()
    with pytest.raises(ValueError, match="choose one of"):
        MissPolicy("gpu")
    with pytest.raises(ValueError, match="needs costs"):
        MissPolicy("auto")


def test_auto_copies_a_prefill_chunk():
    slow_pcie = Costs(copy=20e-3, cpu=2e-3, gpu=0.3e-3)
    assert MissPolicy("auto", slow_pcie).copies(0, 2, rows=1) == 0
    assert MissPolicy("auto", slow_pcie).copies(0, 2, rows=16) == 2
    assert MissPolicy("cpu").copies(0, 2, rows=16) == 0
