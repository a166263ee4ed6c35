"""benchmarks/cpu_expert.py times a real expert: what HostExperts.run computes from the benchmark's buffers is
the SwiGLU expert of the weights its codes and scales stand for, and every rotated copy computes the same."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from mixtral_lite.model.experts import swiglu_expert
from offload.kernels import relative_error

spec = importlib.util.spec_from_file_location("cpu_expert", Path(__file__).resolve().parents[1] / "benchmarks"
                                              / "cpu_expert.py")
cpu_expert = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cpu_expert
spec.loader.exec_module(cpu_expert)


def test_the_benchmarked_expert_computes_its_weights_swiglu():
    d, i = cpu_expert.QUICK
    host = cpu_expert.host_experts(d, i, 3)
    assert host.in_place and host.store.num_experts == 3
    # the weights the benchmark packed: codes drawn in codec.names order (w13, then w2), scale 0.01, zero 8
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randint(0, 16, (2 * i, d), dtype=torch.uint8, generator=gen).float() - 8) * 0.01
    w2 = (torch.randint(0, 16, (d, i), dtype=torch.uint8, generator=gen).float() - 8) * 0.01
    x = torch.randn(1, d)
    want = swiglu_expert(x.bfloat16().float(), w13[:i], w2, w13[i:])
    outs = [host.run(0, e, x) for e in range(3)]
    assert relative_error(outs[0], want) < 0.02  # bf16 activations and products
    assert all(torch.equal(o, outs[0]) for o in outs[1:])  # the copies are the same expert, elsewhere in RAM
