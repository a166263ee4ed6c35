"""--dry-run and the run share one planner (runtime/sizing.py): the dry run's figures equal the run's, and
both equal what the loaded model allocates, for checkpoints and stores under each flag combination below;
the same flags are refused the same way; a store not made yet (--bits) is planned as the quantizer makes it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from mixtral_lite import default_model_path
from mixtral_lite.cli.generate import build_parser
from mixtral_lite.cli.generate import main as generate_main
from mixtral_lite.runtime import sizing
from mixtral_lite.runtime.budget import GIB
from mixtral_lite.runtime.dry_run import figures
from mixtral_lite.runtime.load import load
from mixtral_lite.runtime.plan import plan_load
from offload.prepacked import prepack_write_unsupported

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quantize_experts", ROOT / "tools" / "quantize_experts.py")
qe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qe)

MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                "max_position_embeddings": 32768, "num_attention_heads": 32, "num_experts_per_tok": 2,
                "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
                "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "vocab_size": 32000}
FLAGS = [(), ("--experts-per-layer", "2"), ("--experts-per-layer", "3", "--store", "mmap"), ("--store", "ram"),
         ("--experts-per-layer", "4"), ("--store", "mmap"), "budget for 3"]
COMMON = ("--device", "cpu", "-c", "64", "-b", "16", "-t", "1")


@pytest.fixture(scope="module")
def sources(mixtral_q_ref, tmp_path_factory):
    """A bf16 checkpoint (the shipped one, tied embeddings), an fp32 one, and stores: fused 4-bit (tied and not),
    2-bit, 8-bit (dequantized at every use), and --prepack where this CPU writes it."""
    root = tmp_path_factory.mktemp("plans")
    src = mixtral_q_ref[1]
    out = {"shipped": default_model_path(), "fp32": src}
    for name, argv in (("q4", ["--bits", "4"]), ("q2", ["--bits", "2"]), ("q8", ["--bits", "8", "--group-size", "64"]),
                       ("shipped-q4", ["--bits", "4"])):
        dst = root / name
        assert qe.main([str(default_model_path() if name == "shipped-q4" else src), str(dst), *argv,
                        "--method", "rtn"]) == 0
        out[name] = dst
    if prepack_write_unsupported() is None:
        assert qe.main([str(src), str(root / "pre"), "--bits", "4", "--method", "rtn", "--prepack"]) == 0
        out["prepacked"] = root / "pre"
    return out


def _flags(path: Path, flags, tmp_path: Path) -> list[str]:
    """The flags, with "budget for 3" turned into the --device-memory that leaves room for 3 slots per layer."""
    if flags != "budget for 3":
        return list(flags)
    two = _dry(path, ["--experts-per-layer", "2"], tmp_path)
    layers = two["device_expert_bytes"] // (2 * two["expert_slot_bytes"])
    return ["--device-memory", repr((two["device_total_bytes"] + 1.5 * layers * two["expert_slot_bytes"]) / GIB)]


def _dry(path: Path, flags: list[str], tmp_path: Path) -> dict:
    f = tmp_path / "dry.json"
    generate_main(["-m", str(path), "--dry-run", *COMMON, "--stats-json", str(f), *flags])
    return json.loads(f.read_text())


def _measured(model) -> dict:
    """What the loaded model holds: dense bytes, and K, slot, host and scratch bytes of its experts."""
    e = model.experts
    out = {"dense_bytes": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])}
    if hasattr(e, "engine"):
        c = e.engine.cache
        codec = e.engine.codec
        out |= {"experts": "offloaded", "experts_per_layer": c.quota, "expert_slot_bytes": c.nbytes,
                "expert_pool": c.kind, "pool_slots": c.num_slots,
                "expert_host_bytes": e.engine.store.layout.nbytes,
                "store": "ram" if hasattr(e.engine.store, "blocks") else "mmap",
                "scratch_bytes": codec.scratch_bytes() if hasattr(codec, "scratch_bytes") else 0}
    elif type(e).__name__ == "FusedResidentExperts":
        out |= {"experts": "cached", "experts_per_layer": len(e.mats[0]), "expert_slot_bytes": e.buffers[0].numel(),
                "expert_host_bytes": e.codec.layout.nbytes, "store": "mmap"}
    else:  # resident: w13 [E, 2I, D] and w2 [E, D, I] per layer
        per_expert = (e.w13[0][0].numel() + e.w2[0][0].numel()) * e.w13[0].element_size()
        out |= {"experts": "resident", "experts_per_layer": e.w13[0].shape[0], "expert_slot_bytes": per_expert}
    return out


@pytest.mark.parametrize("flags", FLAGS, ids=[" ".join(f) if isinstance(f, tuple) else f for f in FLAGS])
def test_dry_run_equals_the_run_and_what_it_allocates(sources, flags, tmp_path, capsys):
    for name, path in sources.items():
        argv = _flags(path, flags, tmp_path)
        dry = _dry(path, argv, tmp_path)
        f = tmp_path / "run.json"
        generate_main(["-m", str(path), "-p", "Hi", "-n", "1", *COMMON, "--stats-json", str(f), *argv])
        run = json.loads(f.read_text())["plan"]
        assert dry == run, name
        plan = plan_load(build_parser().parse_args(["-m", str(path), *COMMON, *argv]))
        got = _measured(load(plan))
        assert {k: dry[k] for k in got} == got, (name, argv)
        if flags == "budget for 3":
            assert dry["experts_per_layer"] == 3 or dry["experts"] in ("cached", "resident"), name
            if dry["experts"] == "offloaded":  # 3.5 slots a layer: the global pool takes the half slots too
                layers = dry["pool_slots"] // 3
                assert dry["expert_pool"] == "global" and dry["pool_slots"] > 3 * layers, name
                idle = float(argv[1]) * GIB - dry["device_total_bytes"]
                assert 0 <= idle < dry["expert_slot_bytes"], name  # no more than one slot's bytes idle
    capsys.readouterr()


def test_each_placement_is_covered(sources, tmp_path):
    """The sources and flags above reach every placement and codec the planner knows."""
    seen = set()
    for path in sources.values():
        for flags in FLAGS:
            d = _dry(path, _flags(path, flags, tmp_path), tmp_path)
            seen |= {d["experts"], d["codec"], d["store"]}
    assert {"resident", "cached", "offloaded", "plain", "fused", "dequantize", "ram", "mmap"} <= seen
    if "prepacked" in sources:
        assert "prepacked" in seen


@pytest.mark.parametrize("bits", [4, 2])
def test_planned_store_equals_the_store_the_quantizer_makes(sources, mixtral_q_ref, bits, tmp_path):
    """--dry-run --bits N on the checkpoint gives the figures of the store quantize_experts.py --bits N makes."""
    store = sources[f"q{bits}"]
    for flags in (["--experts-per-layer", "2"], [], ["--store", "mmap", "--experts-per-layer", "3"]):
        planned = _dry(mixtral_q_ref[1], ["--bits", str(bits), *flags], tmp_path)
        made = _dry(store, flags, tmp_path)
        assert planned.pop("source") == "planned store" and made.pop("source") == "store"
        planned.pop("model"), made.pop("model")
        assert planned == made


def test_plan_from_config_json_alone_for_any_device(tmp_path, capsys):
    """The real Mixtral-8x7B's config.json, no weights, no GPU needed: the 4-bit store planned for a CUDA card."""
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    f = tmp_path / "p.json"
    generate_main(["-m", str(cfg), "--dry-run", "--bits", "4", "--device", "cuda", "--device-memory", "11",
                   "--stats-json", str(f)])
    plan = json.loads(f.read_text())
    assert plan["device"] == "cuda" and plan["dtype"] == "bfloat16" and plan["source"] == "planned store"
    assert plan["experts_per_layer"] == 2 and plan["codec"] == "rows" and plan["experts"] == "table"
    # README's figures: a slot holds 4-bit codes + bf16 scale/zero (94.5 MiB at g64); the dense weights 0.95 GiB
    assert plan["expert_slot_bytes"] == 14336 * 4096 * 3 // 2 + 14336 * 4096 * 3 // 64 * 4
    assert round(plan["dense_bytes"] / GIB, 2) == 0.95
    assert plan["device_total_bytes"] <= 11 * GIB
    assert plan["pinned_bytes"] == 32 * 8 * plan["expert_slot_bytes"]  # the converted copies misses are read from
    out = capsys.readouterr().out
    assert "planned store" in out and "one pool of 81 slots for every layer, at least 2 of 8 each" in out
    # the 12 GB card: 2 slots a layer left 1.5 GiB idle; one pool takes 17 more slots, < 1 slot idle
    assert plan["expert_pool"] == "global" and plan["pool_slots"] == 81
    assert 11 * GIB - plan["device_total_bytes"] < plan["expert_slot_bytes"]
    generate_main(["-m", str(cfg), "--dry-run", "--bits", "4", "--device", "cuda", "--device-memory", "11",
                   "--expert-pool", "layer", "--stats-json", str(f)])
    layer = json.loads(f.read_text())
    assert (layer["pool_slots"], layer["experts_per_layer"]) == (64, 2)
    assert "2 of 8 per layer" in capsys.readouterr().out
    generate_main(["-m", str(cfg), "--dry-run", "--bits", "4", "--device", "cuda", "--device-memory", "11",
                   "--miss-policy", "copy", "--stats-json", str(f)])
    copy = json.loads(f.read_text())
    assert copy["codec"] == "fused" and copy["experts"] == "offloaded"
    assert copy["expert_slot_bytes"] == plan["expert_slot_bytes"]  # torch's CUDA int4 layout: the same bytes
    assert copy["pinned_bytes"] == 32 * 8 * copy["expert_host_bytes"]  # the packed store, pinned


@pytest.mark.parametrize("prepack", [False, True])
def test_table_engine_sizes(sources, prepack, tmp_path):
    """A store planned for CUDA runs on the table engine: its slots, pinned copies and staging, measured on an
    engine built on the CPU the way runtime/offloading.table_engine builds it (the shipped model's shapes: the
    kernels take widths that are multiples of 256)."""
    from mixtral_lite.model.qstore import open_store
    from offload.rows import scratch_bytes as rows_scratch_bytes
    from offload.table import TableEngine

    path = sources["shipped-q4"]
    if prepack:
        if prepack_write_unsupported() is not None:
            pytest.skip("this CPU writes no --prepack store")
        path = tmp_path / "pre"
        assert qe.main([str(default_model_path()), str(path), "--bits", "4", "--method", "rtn", "--prepack"]) == 0
    plan = plan_load(build_parser().parse_args(["-m", str(path), "-c", "64", "--experts-per-layer", "2",
                                                "--device", "cuda"]), planning=True)
    sz, placement = sizing.decide(plan)
    assert (sz.codec, placement.experts, placement.k, placement.store) == ("rows", "table", 2, "ram")
    store = open_store(path)
    codec = store.rows_codec("cpu")
    eng = TableEngine(store.expert_store("mmap"), codec, 2, "cpu", top_k=2, moe=object())
    assert eng.cache.nbytes == sz.slot and eng.host[0][0].numel() == sz.host
    assert sz.scratch == eng._scratch.numel() + eng._rows_staging.numel() + rows_scratch_bytes(codec.out_shapes)
    assert figures(plan, sz, placement)["pinned_bytes"] == sum(b.numel() for row in eng.host for b in row)


def test_miss_policy_read_needs_cuda_and_a_store(sources, capsys):
    for path, device in ((sources["q4"], "cpu"), (sources["fp32"], "cuda")):
        with pytest.raises(SystemExit):
            generate_main(["-m", str(path), "--dry-run", "--device", device, "--miss-policy", "read"])
        assert "--miss-policy read: needs --device cuda and a quantized store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(["-m", str(sources["q8"]), "--dry-run", "--device", "cuda", "--miss-policy", "read"])
    assert "--miss-policy read: hidden size 64 is not a multiple of 256" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(["-m", str(sources["shipped-q4"]), "--dry-run", "--device", "cuda", "--miss-policy", "read",
                       "--store", "mmap"])
    assert "--miss-policy read: --store mmap" in capsys.readouterr().err


def test_cards_agree_with_device_memory(tmp_path, capsys):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    f = tmp_path / "p.json"
    generate_main(["-m", str(cfg), "--dry-run", "--bits", "3", "--cards", "8,12,16,24", "--stats-json", str(f)])
    rows = json.loads(f.read_text())["cards"]
    assert [r["card_gib"] for r in rows] == [8, 12, 16, 24] and "per card" in capsys.readouterr().out
    for r in rows:
        if not r["fits"]:
            with pytest.raises(SystemExit):
                generate_main(["-m", str(cfg), "--dry-run", "--bits", "3", "--device", "cuda", "--device-memory",
                               str(r["card_gib"])])
            assert "is too small" in capsys.readouterr().err
            continue
        generate_main(["-m", str(cfg), "--dry-run", "--bits", "3", "--device", "cuda", "--device-memory",
                       str(r["card_gib"]), "--stats-json", str(f)])
        one = json.loads(f.read_text())
        assert (one["experts_per_layer"], one["device_total_bytes"]) == (r["experts_per_layer"],
                                                                        r["device_total_bytes"])
    assert not rows[0]["fits"] and rows[-1]["fits"]  # 8 GiB too small for 3-bit slots; 24 GiB is not


@pytest.mark.parametrize("argv, message", [
    (["--experts-per-layer", "1000"], "--experts-per-layer 1000: must be between experts_per_tok (2) and num_experts"),
    (["--experts-per-layer", "1"], "--experts-per-layer 1: must be between"),
    (["--experts-per-layer", "2", "--device-memory", "12"], "either --experts-per-layer or --device-memory"),
    (["--device-memory", "0.001"], "--device-memory 0.001 GiB is too small"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_flag_checks_are_the_same(sources, argv, message, dry, capsys):
    mode = ["--dry-run"] if dry else ["-p", "Hi", "-n", "1"]
    for path in (sources["fp32"], sources["q4"]):
        with pytest.raises(SystemExit) as e:
            generate_main(["-m", str(path), *COMMON, *mode, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err and "load:" not in err


@pytest.mark.parametrize("dry", [True, False])
def test_dense_model_refuses_offload_flags(mistral_ref, dry, capsys):
    mode = ["--dry-run"] if dry else ["-p", "Hi", "-n", "1"]
    for flag in (["--store", "mmap"], ["--experts-per-layer", "2"]):
        with pytest.raises(SystemExit):
            generate_main(["-m", str(mistral_ref[1]), *COMMON, *mode, *flag])
        assert f"{flag[0]}: the model is dense" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["-p", "x", "--bits", "4"], "--bits: only with --dry-run"),
    (["-p", "x", "--cards"], "--cards: only with --dry-run"),
    (["--dry-run", "--group-size", "64"], "--group-size: only with --bits"),
    (["--dry-run", "--bits", "4", "--group-size", "7"], "--bits 4 --group-size 7"),
    (["--dry-run", "--cards", "--device", "cpu"], "--cards plans CUDA cards"),
    (["--dry-run", "--cards", "--experts-per-layer", "2"], "drop --experts-per-layer"),
    (["--dry-run", "--cards", "8,x"], "--cards: '8,x'"),
])
def test_planning_flags(mixtral_ref, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        generate_main(["-m", str(mixtral_ref[1]), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_bits_on_a_store_is_refused(sources, capsys):
    with pytest.raises(SystemExit):
        generate_main(["-m", str(sources["q4"]), "--dry-run", "--bits", "2"])
    assert "is already a quantized store" in capsys.readouterr().err


def test_plan_after_the_download_reads_the_files_dtype(mixtral_ref, tmp_path):
    """A float32 checkpoint whose config.json says bfloat16: the host bytes are the files' (the run's)."""
    d = tmp_path / "m"
    shutil.copytree(mixtral_ref[1], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    plan = _dry(d, ["--experts-per-layer", "2"], tmp_path)
    assert plan["expert_host_bytes"] == 3 * 96 * 64 * torch.float32.itemsize
    plan_l = plan_load(build_parser().parse_args(["-m", str(d), *COMMON, "--experts-per-layer", "2"]))
    sz = sizing.sizes(plan_l)
    assert figures(plan_l, sz, sizing.place(plan_l, sz)) == plan
