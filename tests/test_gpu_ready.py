"""What would crash on real GPU setups, checked in the parts a CPU can see (issue 12, items 1-8).

Item 8 (a dropped engine's pool and landing prefetches) is in test_stream_order.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_offload_synth import make_experts, open_source, reference, write_checkpoint

from mixtral_lite.model.compat import MIN_TORCH, require_torch
from mixtral_lite.model.config import ModelConfig
from mixtral_lite.model.experts import swiglu_expert
from mixtral_lite.runtime import budget, offloading
from mixtral_lite.runtime.plan import LoadPlan
from offload.codec import PlainCodec
from offload.engine import OffloadEngine
from offload.quant import HQQCodec, QuantSpec, expert_layout
from offload.store import PIN_MIN, RamStore, pin_chunks

ROOT = Path(__file__).resolve().parents[1]
L, E, INTER, DIM = 2, 4, 32, 16
GIB, MIB = 1 << 30, 1 << 20
MIXTRAL = {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "torch_dtype": "bfloat16"}


# -- 1: the torch floor ---------------------------------------------------------------------------
def test_old_torch_refused_at_import_with_the_fix():
    for old in ("2.2.0", "2.4.1+cu121"):
        with pytest.raises(ImportError, match=r"needs torch >= 2\.5 .*pip install 'torch>=2\.5'"):
            require_torch(old)
    require_torch("2.5.0")
    require_torch()  # the installed one
    assert '"torch>=2.5"' in (ROOT / "pyproject.toml").read_text() and MIN_TORCH == (2, 5)


# -- 2: pinning in blocks CUDA's host allocator does not round up -----------------------------------
@pytest.mark.parametrize("total", [1, PIN_MIN, 3 * PIN_MIN + 5, int(13.3 * GIB), int(22.4 * GIB)])
def test_pin_chunks_are_powers_of_two_covering_the_store(total):
    sizes = pin_chunks(total)
    assert all(s & (s - 1) == 0 for s in sizes)  # a power of two: the allocator takes it as it is
    assert total <= sum(sizes) < total + PIN_MIN  # not 32 GiB for 22.4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tensors = make_experts(L, E, INTER, DIM)
    return tensors, write_checkpoint(tmp_path_factory.mktemp("experts"), tensors)


def test_chunked_pinned_store_serves_every_expert(ckpt):
    """Tiny blocks (so experts straddle them) from a fake pinner: the engine's output is the reference's."""
    tensors, files = ckpt
    asked = []

    def pinner(n):
        asked.append(n)
        return torch.empty(n, dtype=torch.uint8)

    source = open_source(files, L, E, INTER, DIM)
    host = RamStore(source, pin=True, pinner=pinner, chunk=4096)
    assert host.pinned and len(asked) > 1 and all(n <= 4096 for n in asked)
    assert any(len(host.pieces(layer, e)) == 2 for layer in range(L) for e in range(E))
    engine = OffloadEngine(host, PlainCodec(host.layout, ("w1", "w2", "w3"), torch.float32, "cpu"),
                           swiglu_expert, 2, "cpu")
    g = torch.Generator().manual_seed(0)
    for layer in range(L):
        x, ids = torch.randn(3, DIM, generator=g), [[0, 1], [2, 3], [1, 2]]
        w = torch.softmax(torch.randn(3, 2, generator=g), -1)
        assert torch.equal(engine.run(layer, x, ids, w), reference(tensors, layer, x, ids, w))


def test_pinning_failure_falls_back_to_pageable_with_a_warning(ckpt):
    _, files = ckpt

    def refuse(n):
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    with pytest.warns(UserWarning, match="could not page-lock .* staging buffers"):
        host = RamStore(open_source(files, L, E, INTER, DIM), pin=True, pinner=refuse)
    assert not host.pinned and host.host_bytes == L * E * host.layout.nbytes


# -- 3 and 4: the device budget -------------------------------------------------------------------
def test_cuda_without_flags_takes_the_budget_path(mixtral_ref):
    """No K and no --device-memory on CUDA: a store's K is left to the free memory at load (no CUDA call yet);
    a Hugging Face checkpoint keeps every expert resident, on either device."""
    from mixtral_lite.runtime.sizing import Sizes, decide, place

    _, path = mixtral_ref
    cfg = ModelConfig.from_dir(path)
    cpu, cuda = (LoadPlan(path, cfg, torch.device(d), t, 4096, 512) for d, t in (("cpu", torch.float32),
                                                                                ("cuda", torch.bfloat16)))
    assert offloading.build(cpu, decide(cpu)[1]) is None and offloading.build(cuda, decide(cuda)[1]) is None
    store = Sizes("store", 1 << 20, slot=1 << 16, host=1 << 15, codec="fused")
    assert place(cuda, store).experts == "offloaded" and place(cuda, store).k is None
    assert offloading.build(cuda, place(cuda, store)) is not None
    assert place(cpu, store).experts == "cached"  # the CPU: every expert converted once, read through the mapping


def test_12_gib_plan_counts_what_torch_does_not_see():
    """Mixtral at 2 bits, g16 (dequantizing codec): the plan with context, scratch, workspaces, the
    attention peak and a margin fits 12 GiB, where the old arithmetic planned 12.15 GiB before the context."""
    cfg = ModelConfig.from_dict(MIXTRAL)
    i, d = cfg.intermediate_size, cfg.hidden_size
    shapes = {"w1": (i, d), "w2": (d, i), "w3": (i, d)}
    spec = QuantSpec(bits=2, group_size=16)
    slot = expert_layout(shapes, spec).nbytes
    scratch = HQQCodec(shapes, spec, "meta", torch.bfloat16).scratch_bytes() + slot  # + device staging
    assert scratch > 300 * MIB  # three dequantized bf16 matrices
    plan = budget.plan_slots(cfg, torch.bfloat16, 12 * GIB, slot, window=4096, chunk=512,
                             device=torch.device("cuda"), scratch=scratch)
    assert plan.total() <= 12 * GIB
    assert plan.overhead >= budget.CUDA_CONTEXT + budget.CUBLAS_WORKSPACE + budget.MARGIN_MIN
    assert budget.attention_bytes(cfg, torch.bfloat16, 4608, 512) >= 280 * MIB  # scores + softmax at T=512
    kv, act = budget.runtime_bytes(cfg, torch.bfloat16, 4096, 512)
    old_k = (12 * GIB - budget.dense_bytes(cfg, torch.bfloat16) - kv - act) // (32 * slot)
    assert plan.k < old_k
    measured = budget.plan_slots(cfg, torch.bfloat16, 12 * GIB, slot, window=4096, chunk=512,
                                 device=torch.device("cuda"), scratch=scratch, measured=True)
    assert measured.dense == 0 and measured.k > plan.k  # free memory already excludes dense and context


def test_reserved_beyond_the_plan_is_reported():
    plan = budget.DevicePlan(12 * GIB, 0, 0, 0, 100 * MIB, 0, 50 * MIB, 32, k=4)
    assert budget.check_reserved(plan, 32 * 4 * 50 * MIB + 100 * MIB) is None
    assert "reserved" in budget.check_reserved(plan, 32 * 4 * 50 * MIB + 2 * GIB)


# -- 5: the naive streamer in bf16 ----------------------------------------------------------------
def test_naive_streamer_prefills_in_bf16(ckpt):
    spec = importlib.util.spec_from_file_location("generate_runners", ROOT / "benchmarks" / "generate_runners.py")
    runners = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runners)
    tensors, files = ckpt
    source = open_source(files, L, E, INTER, DIM)
    codec = PlainCodec(source.layout, ("w1", "w2", "w3"), torch.bfloat16, "cpu")
    naive = runners.NaiveStreamer(source, codec, swiglu_expert, "cpu", E)
    x = torch.randn(4, DIM).bfloat16()
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3]])
    w = torch.softmax(torch.randn(4, 2), -1)  # fp32, as the router gives them
    got = naive.run(0, x, ids, w)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, reference(tensors, 0, x, ids.tolist(), w, torch.bfloat16))
    assert runners.default_dtype("cuda") == torch.bfloat16 and runners.default_dtype("cpu") == torch.float32


# -- 6: perplexity offloads as generate does --------------------------------------------------------
def test_perplexity_takes_the_offload_flags(mixtral_ref, tmp_path, capsys):
    from mixtral_lite.cli.perplexity import main

    _, path = mixtral_ref
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a fortune")
    base = ["-m", str(path), "-f", str(text), "--ctx", "8", "--stride", "4", "--json", "--no-progress"]
    main(base)
    resident = json.loads(capsys.readouterr().out.splitlines()[-1])
    main([*base, "--experts-per-layer", "2", "--store", "mmap"])
    offloaded = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert offloaded["perplexity"] == resident["perplexity"] and "hit_rate" in offloaded
    assert resident["dtype"] == "float32"  # the CPU default; on CUDA the checkpoint's (generate's rule)


# -- 7: native Windows has no `resource` and no mmap.madvise ----------------------------------------
def test_imports_without_unix_only_modules(ckpt):
    _, files = ckpt
    code = f"""
import sys, mmap
import psutil, torch  # on Linux psutil itself needs resource: loaded first, as Windows' psutil would be
sys.modules["resource"] = None  # what `import resource` finds on Windows
del mmap.MADV_DONTNEED
sys.path.insert(0, {str(ROOT / 'tests')!r})
from mixtral_lite.runtime import runstats
from offload import store
from test_offload_synth import open_source
assert runstats.resource is None and runstats.peak_rss_bytes() > 0 and not store.CAN_DROP_PAGES
src = open_source([{', '.join(repr(str(f)) for f in files)}], {L}, {E}, {INTER}, {DIM})
src.pieces(0, 0); src.release(0, 0)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


# -- hidden costs: plain experts run the resident products; memory beside the allocator's peak ----------
def test_plain_slots_decode_w1_and_w3_as_one_matrix():
    from mixtral_lite.model.experts import expert_function, swiglu_w13
    from offload.packing import Layout, pack_into, views

    i, d = 32, 16
    mats = {"w1": torch.randn(i, d), "w3": torch.randn(i, d), "w2": torch.randn(d, i)}
    stack = {"w13": ("w1", "w3")}
    layout = Layout.of(mats)  # w1, w3, w2: back to back
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    pack_into(buf, layout, mats)
    codec = PlainCodec(layout, ("w1", "w2", "w3"), torch.float32, "cpu", stack=stack)
    w13, w2 = codec.decode(views(buf, layout))
    assert codec.names == ("w13", "w2") and expert_function(codec) is swiglu_w13
    assert torch.equal(w13, torch.cat([mats["w1"], mats["w3"]])) and w13.data_ptr() == buf.data_ptr()
    x = torch.randn(1, d)
    assert torch.equal(swiglu_w13(x, w13, w2), swiglu_expert(x, mats["w1"], mats["w2"], mats["w3"]))
    apart = Layout.of({k: mats[k] for k in ("w1", "w2", "w3")})  # w2 in between: nothing to stack
    assert PlainCodec(apart, ("w1", "w2", "w3"), torch.float32, "cpu", stack=stack).names == ("w1", "w2", "w3")
    stored = Layout.of({k: v.bfloat16() for k, v in mats.items()})  # a GPU converting into scratch
    on_gpu = PlainCodec(stored, ("w1", "w2", "w3"), torch.float32, "meta", stack=stack)
    meta = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in mats.items()}
    w13, _ = on_gpu.decode(meta)
    assert on_gpu.names == ("w13", "w2") and w13.shape == (2 * i, d) and w13.dtype == torch.float32


def test_cuda_memory_reported_beside_the_peak():
    from mixtral_lite.runtime.runstats import format_stats

    stats = {"load_s": 1.0, "prompt_tokens": 3, "ttft_s": 0.1, "generated_tokens": 4, "decode_tokens_per_s": 9.0,
             "peak_rss_bytes": GIB, "peak_device_bytes": 2 * GIB, "device": "cuda:0",
             "device_peak_reserved_bytes": 3 * GIB, "device_used_bytes": 4 * GIB, "device_total_bytes": 12 * GIB}
    line = format_stats(stats).splitlines()[3]
    assert "peak allocated 2048.0 MiB, peak reserved 3072.0 MiB, device in use 4096 of 12288 MiB" in line
