"""The miss cost model's decisions on injected costs: all-copy, all-CPU, a split in between."""

from __future__ import annotations

import pytest

from offload.miss_policy import AdmissionValue, Costs, MissPolicy, host_time, layer_time, split


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
    assert MissPolicy("copy").plan(1, 3) == (3, 0)
    assert MissPolicy("cpu").plan(1, 3) == (0, 0)
    assert MissPolicy("auto", c).plan(0, 2) == (0, 0)
    assert MissPolicy("cpu").plan(2, 0) == (0, 0)
    scripted = MissPolicy("auto", script=lambda step, h, m: step % 3)
    assert [scripted.plan(0, 2) for _ in range(4)] == [(0, 0), (1, 0), (2, 0), (0, 0)]
    assert "copy" in MissPolicy("auto", c).describe()
    with pytest.raises(ValueError, match="choose one of"):
        MissPolicy("gpu")
    with pytest.raises(ValueError, match="needs costs"):
        MissPolicy("auto")


def test_auto_copies_a_prefill_chunk():
    slow_pcie = Costs(copy=20e-3, cpu=2e-3, gpu=0.3e-3)
    assert MissPolicy("auto", slow_pcie).plan(0, 2, rows=1) == (0, 0)
    assert MissPolicy("auto", slow_pcie).plan(0, 2, rows=16) == (2, 0)
    assert MissPolicy("cpu").plan(0, 2, rows=16) == (0, 0)
    assert not MissPolicy("auto", slow_pcie).host_possible(16) and MissPolicy("auto", slow_pcie).host_possible(1)
    assert MissPolicy("cpu").host_possible(16) and not MissPolicy("copy").host_possible(1)


def test_a_host_run_beside_a_copy_runs_at_the_shared_pace_until_the_copies_end():
    c = Costs(copy=4e-3, cpu=2e-3, gpu=0.5e-3, cpu_beside_copy=8e-3)
    assert host_time(0, 1, c) == 0.0
    assert host_time(1, 0, c) == pytest.approx(2e-3)
    assert host_time(1, 2, c) == pytest.approx(8e-3)  # ends while the copies (8 ms) still stream
    # half an expert in the copy's 4 ms at the shared pace, the other half at the full pace
    assert host_time(1, 1, c) == pytest.approx(4e-3 + 0.5 * 2e-3)
    assert layer_time(0, 2, 1, c) == pytest.approx(max(4e-3 + 0.5e-3, 5e-3))
    assert host_time(1, 1, Costs(copy=4e-3, cpu=2e-3, gpu=0.5e-3)) == pytest.approx(2e-3)  # no contention


def test_a_copy_credited_with_its_later_value_is_made_when_it_costs_less():
    # two misses: copying one ends the layer 1.43 ms later than running both on the host
    c = Costs(copy=3.76e-3, cpu=1.32e-3, gpu=0.31e-3, cpu_beside_copy=2.03e-3)
    extra = layer_time(0, 2, 1, c) - layer_time(0, 2, 0, c)
    assert extra == pytest.approx(1.43e-3, abs=1e-5)
    assert split(0, 2, c) == 0
    assert split(0, 2, c, value=extra * 0.9) == 0 and split(0, 2, c, value=extra * 1.1) == 1


def test_admission_value_counts_hits_minus_the_displaced_experts_requests():
    v = AdmissionValue()
    assert v.per_admission() == AdmissionValue.PRIOR_HITS
    v.admitted(0, expert=5, displaced=(0, 2))
    v.admitted(1, expert=5, displaced=None)
    v.used(0, {5, 1})  # a hit on the admitted expert: +1
    v.used(0, {2, 5})  # the displaced one asked for (+1 -1): 0
    v.used(0, {2, 3})  # -1
    v.used(1, {5})  # layer 1's own record
    v.evicted(0, 5)
    assert (v.net, v.count) == (AdmissionValue.PRIOR_HITS + 0, 2)
    v.evicted(0, 5)  # not open any more: ignored
    v.settle()
    assert (v.net, v.count) == (AdmissionValue.PRIOR_HITS + 1, 3)
    v.admitted(0, 4, (0, 6))
    for _ in range(10):
        v.used(0, {6})
    v.settle()
    assert v.per_admission() == 0.0  # never negative


def test_auto_copies_by_choice_once_admissions_have_paid():
    c = Costs(copy=3.76e-3, cpu=1.32e-3, gpu=0.31e-3, cpu_beside_copy=2.03e-3)
    p = MissPolicy("auto", c)
    assert p.plan(0, 2) == (1, 1)  # the prior: 2 net hits x 1.32 ms > 1.43 ms
    p.value.net, p.value.count = 1.0, 1  # measured: 1 net hit an admission
    assert p.plan(0, 2) == (0, 0)
