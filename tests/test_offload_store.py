"""Expert stores: packed bytes, validation errors that name layer and expert, mmap RSS."""

from __future__ import annotations

import gc
import json
import struct

import psutil
import pytest
import torch
from test_offload_synth import ROLES, make_engine, make_experts, name, open_source, write_checkpoint, write_streaming

from offload.packing import Layout, pack, views
from offload.store import RamStore, SafetensorsSource, StoreError

L, E, INTER, DIM = 2, 4, 8, 16


def packed_bytes(store, layer, expert) -> torch.Tensor:
    buf = torch.zeros(store.layout.nbytes, dtype=torch.uint8)
    for p in store.pieces(layer, expert):
        buf[p.offset : p.offset + p.src.numel()] = p.src
    return buf


@pytest.mark.parametrize("shards", [1, 3])
def test_ram_and_mmap_give_the_packed_expert(tmp_path, shards):
    tensors = make_experts(L, E, INTER, DIM, torch.bfloat16)
    source = open_source(write_checkpoint(tmp_path, tensors, shards), L, E, INTER, DIM)
    ram = RamStore(source)
    assert len(source.pieces(1, 2)) == 3 and len(ram.pieces(1, 2)) == 1  # HF fp: 3 regions per expert
    for layer in range(L):
        for e in range(E):
            want, layout = pack({w: tensors[name(layer, e, w)] for w in ROLES})
            assert layout == source.layout == ram.layout
            assert torch.equal(packed_bytes(source, layer, e), want)
            assert torch.equal(packed_bytes(ram, layer, e), want)
            got = views(packed_bytes(ram, layer, e), layout)
            assert torch.equal(got["w2"], tensors[name(layer, e, "w2")])
    assert ram.host_bytes == L * E * layout.nbytes and source.host_bytes == 0


def test_packed_source_reads_one_region(tmp_path):
    """The quantized store's form: one uint8 tensor per expert is the packed buffer."""
    layout = Layout.plan([("q", torch.uint8, (40,)), ("scale", torch.float16, (5,))])
    bufs = {f"e{layer}.{e}": torch.randint(0, 255, (layout.nbytes,), dtype=torch.uint8)
            for layer in range(L) for e in range(E)}
    files = write_checkpoint(tmp_path, bufs)
    source = SafetensorsSource(files, L, E, lambda layer, e: {"packed": f"e{layer}.{e}"}, layout=layout)
    assert len(source.pieces(1, 3)) == 1
    assert torch.equal(packed_bytes(source, 1, 3), bufs["e1.3"])
    bad = Layout.plan([("q", torch.uint8, (41,))])
    with pytest.raises(StoreError, match=r"layer 0 expert 0: tensor 'e0.0' .* expected uint8 \(64,\)"):
        SafetensorsSource(files, L, E, lambda layer, e: {"packed": f"e{layer}.{e}"}, layout=bad)


def test_wrong_shape_names_layer_and_expert(tmp_path):
    tensors = make_experts(L, E, INTER, DIM)
    tensors[name(1, 3, "w2")] = torch.zeros(DIM, INTER + 1)
    files = write_checkpoint(tmp_path, tensors)
    with pytest.raises(StoreError, match=r"layer 1 expert 3: tensor 'layers.1.experts.3.w2' .* \(16, 9\), "
                                         r"expected float32 \(16, 8\)"):
        open_source(files, L, E, INTER, DIM)


def test_truncated_file_names_layer_and_expert(tmp_path):
    files = write_checkpoint(tmp_path, make_experts(L, E, INTER, DIM))
    data = files[0].read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    files[0].write_bytes(data[:-100])
    layer, expert = last.split(".")[1], last.split(".")[3]
    with pytest.raises(StoreError, match=rf"layer {layer} expert {expert}: .*truncated file"):
        open_source(files, L, E, INTER, DIM)
    files[0].write_bytes(data[:5])
    with pytest.raises(StoreError, match="too short to be a safetensors file"):
        open_source(files, L, E, INTER, DIM)
    files[0].write_bytes(struct.pack("<Q", 10**9) + data[8:])
    with pytest.raises(StoreError, match="header length 1000000000 does not fit"):
        open_source(files, L, E, INTER, DIM)


def test_store_that_does_not_match_the_config(tmp_path):
    files = write_checkpoint(tmp_path, make_experts(L, E, INTER, DIM))
    with pytest.raises(StoreError, match=r"layer 0 expert 4: tensor 'layers.0.experts.4.w1' \(w1\) is not in "
                                         r"the store .* does the store match the model's config"):
        open_source(files, L, E + 1, INTER, DIM)
    with pytest.raises(StoreError, match=r"layer 0 expert 0: .* expected float32 \(12, 16\)"):
        open_source(files, L, E, 12, DIM)


BIG = (4, 8, 1408, 1024)  # layers, experts, I, D: ~277 MB of fp16 experts


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    return path, write_streaming(path, *BIG)


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_mmap_rss_stays_well_under_the_experts_size(big):
    """Every expert streamed through a 2-slot pool: RSS grows by about the pool only."""
    path, expert_bytes = big
    layers, experts, inter, dim = BIG
    total = layers * experts * expert_bytes
    rss0 = rss()
    engine = make_engine([path], layers, experts, inter, dim, slots=2, store="mmap", prefetch=False,
                         dtype=torch.float16)
    x, w = torch.ones(1, dim, dtype=torch.float16), torch.full((1, 2), 0.5, dtype=torch.float16)
    for step in range(experts // 2):
        for layer in range(layers):
            engine.run(layer, x, [[2 * step, 2 * step + 1]], w)
    grown = rss() - rss0
    pool = engine.cache.allocated_bytes
    assert engine.stats()["bytes_host_to_device"] == total  # every expert really went through
    assert pool == total // 4
    assert grown < pool + total // 8, f"RSS grew {grown / 1e6:.0f} MB for {total / 1e6:.0f} MB of experts"


def test_ram_store_is_built_without_a_second_copy(big):
    """Packing from the mapped file drops each expert's pages: RSS grows by one copy, not two."""
    path, expert_bytes = big
    layers, experts, inter, dim = BIG
    total = layers * experts * expert_bytes
    rss0 = rss()
    ram = RamStore(open_source([path], layers, experts, inter, dim))
    grown = rss() - rss0
    assert ram.host_bytes == total
    assert total * 0.9 < grown < total * 1.25, f"RSS grew {grown / 1e6:.0f} MB for {total / 1e6:.0f} MB"
