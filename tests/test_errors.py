"""The front door (issue 11): every bad input is one line `error: ...` naming the culprit, exit 2, no
traceback, nothing half-written; nothing silently wrong. In-process through main(argv): the front door
is the same code a subprocess runs (tests/test_cli_process.py covers what needs a real process)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from refs import rewrite_config
from safetensors.torch import load_file, save_file

from mixtral_lite.cli import perplexity as ppl
from mixtral_lite.cli.generate import main as generate_main
from mixtral_lite.generation.decode import NonFiniteError, generate
from mixtral_lite.runtime.load import load_model

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quantize_experts", ROOT / "tools" / "quantize_experts.py")
qe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qe)


def one_line_error(capsys, fn, argv, status=2) -> str:
    """Run a CLI main; assert it exits `status` with exactly one `error:` line and no traceback."""
    with pytest.raises(SystemExit) as e:
        rc = fn([str(a) for a in argv])
        raise SystemExit(rc)
    err = capsys.readouterr().err
    assert e.value.code == status, err
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def model_copy(mixtral_ref, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(mixtral_ref[1], dst)
    return dst


def _edit(path: Path, fn) -> None:
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


# ---- 1. silent wrong results -----------------------------------------------------------------
@pytest.mark.parametrize("tensor", ["model.layers.1.block_sparse_moe.experts.2.w1.weight",
                                    "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
                                    "lm_head.weight"])
def test_nan_weight_named_by_generate_and_perplexity(model_copy, tensor, capsys):
    _edit(model_copy, lambda t: t[tensor].view(-1).__setitem__(3, math.nan))
    line = one_line_error(capsys, generate_main, ["-m", model_copy, "-p", "Hello", "-n", 2, "-t", 1])
    assert tensor in line and "model.safetensors" in line and "NaN/Inf" in line
    text = model_copy / "t.txt"
    text.write_text("It is a truth universally acknowledged.")
    line = one_line_error(capsys, ppl.main, ["-m", model_copy, "-f", text, "--json", "--no-progress"])
    assert tensor in line


def test_inf_after_cast_to_float16_is_named(model_copy, capsys):
    _edit(model_copy, lambda t: t["model.norm.weight"].__setitem__(0, 1e6))
    line = one_line_error(capsys, generate_main, ["-m", model_copy, "-p", "Hi", "--dtype", "float16", "-t", 1])
    assert "'model.norm.weight'" in line and "after the cast to float16" in line


def test_nan_logits_stop_generation_naming_the_step(mixtral_ref):
    model = load_model(mixtral_ref[1])
    model.norm.weight.data.fill_(math.nan)  # as an offloaded expert gone bad would (never read at load)
    with pytest.raises(NonFiniteError, match="prompt evaluation: the model's logits hold"):
        generate(model, [[1, 415]], 4, window=16)
    with pytest.raises(ValueError, match=r"text tokens 0\.\.\d+ .*log-likelihood is nan"):
        ppl.perplexity(model, [415, 2936, 9060], 1, ctx=8, stride=4)


def test_quantizer_refuses_nan_expert(model_copy, tmp_path, capsys):
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    _edit(model_copy, lambda t: t[name].view(-1).__setitem__(0, math.inf))
    line = one_line_error(capsys, qe.main, [model_copy, tmp_path / "q", "--bits", 4])
    assert name in line


def test_rms_norm_eps_negative_named(model_copy, capsys):
    rewrite_config(model_copy, rms_norm_eps=-1)
    assert "'rms_norm_eps' must be a finite number > 0" in one_line_error(
        capsys, generate_main, ["-m", model_copy, "-p", "x"])


# ---- 2, 3. quantizer: resume on a finished store, numeric flags, DST, device -----------------
def test_quantizer_flags_and_finished_store(mixtral_ref, tmp_path, capsys):
    src = mixtral_ref[1]
    line = one_line_error(capsys, qe.main, [src, tmp_path / "g", "--bits", 4, "--group-size", 0])
    assert "--group-size must be a positive integer, got 0" in line
    assert not (tmp_path / "g").exists()
    assert "--shard-mb must be a positive" in one_line_error(capsys, qe.main, [src, tmp_path / "s", "--bits", 4,
                                                                               "--shard-mb", -1])
    (tmp_path / "file").write_text("x")
    assert "is a file; DST must be a folder" in one_line_error(capsys, qe.main, [src, tmp_path / "file",
                                                                                 "--bits", 4])
    if not torch.cuda.is_available():
        line = one_line_error(capsys, qe.main, [src, tmp_path / "c", "--bits", 4, "--device", "cuda"])
        assert "--device cuda: no CUDA device" in line and not (tmp_path / "c").exists()
    dst = tmp_path / "q"
    assert qe.main([str(src), str(dst), "--bits", "4"]) == 0
    assert qe.main([str(src), str(dst), "--bits", "4", "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    line = one_line_error(capsys, qe.main, [src, dst, "--bits", "2", "--resume"])
    assert "other settings" in line and "expert quantization: store bits=4" in line and "now bits=2" in line
    line = one_line_error(capsys, qe.main, [dst, tmp_path / "again", "--bits", "4"])  # a finished store as SRC
    assert "is already a quantized store" in line and f"generate -m {dst}" in line and "--resume" not in line
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert "is a GGUF file" in one_line_error(capsys, qe.main, [tmp_path / "m.gguf", tmp_path / "g2"])


@pytest.mark.parametrize("command, argv, closest", [
    ("generate", ["--tempreature", "0", "-p", "x"], "--temperature"),
    ("generate", ["--experts-per-layr=4"], "--experts-per-layer"),
    ("chat", ["--sytem", "be brief"], "--system"),
    ("server", ["--prot", "8081"], "--port"),
    ("perplexity", ["-f", "x", "--strdie", "3"], "--stride"),
    ("quantize", ["a", "b", "--method", "rtn", "--bitz", "4"], "--bits"),
])
def test_a_mistyped_flag_is_one_line_naming_the_closest(command, argv, closest, capsys):
    """No 12-line usage block: one line, exit 2, with argparse's message and the nearest real flag."""
    from mixtral_lite.cli import chat
    from mixtral_lite.serve import server

    main = {"generate": generate_main, "chat": chat.main, "server": server.main, "perplexity": ppl.main,
            "quantize": qe.main}[command]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unrecognized arguments" in err and f"(did you mean {closest}?)" in err and "usage:" not in err


def test_perplexity_numeric_flags(mixtral_ref, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Some words to score here.")
    for flags, message in ((["--max-tokens", -5], "--max-tokens: -5 is out of range"),
                           (["-c", 0], "-c/--ctx: 0 is out of range"),
                           (["--stride", 0], "--stride: 0 is out of range"),
                           (["-c", 1], "need --ctx >= 2")):
        assert message in one_line_error(capsys, ppl.main, ["-m", mixtral_ref[1], "-f", text, *flags])


# ---- 7, 9, 10. generate's flags, prompts and outputs ---------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["-b", 0], "-b/--batch-size: 0 is out of range"), (["-b", -1], "-b/--batch-size: -1 is out of range"),
    (["-c", 0], "-c/--ctx-size: 0 is out of range"), (["-c", -4], "-c/--ctx-size: -4 is out of range"),
    (["--device-memory", "nan"], "--device-memory: nan must be a finite number > 0"),
    (["--device-memory", "inf"], "--device-memory: inf must be a finite number > 0"),
    (["-s", 1 << 64], "-s/--seed: 18446744073709551616 is out of range"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--top-k", -1], "--top-k: -1 is out of range"),
    (["--experts-per-layer", 0], "--experts-per-layer: 0 is out of range"),
])
def test_generate_numeric_flags(mixtral_ref, flags, message, capsys):
    assert message in one_line_error(capsys, generate_main, ["-m", mixtral_ref[1], "-p", "x", *flags])


def test_prompt_files_and_output_paths(mixtral_ref, tmp_path, capsys):
    m = mixtral_ref[1]
    (tmp_path / "bin").write_bytes(b"\x7fELF\x00\x01")
    (tmp_path / "latin1").write_bytes("caf\xe9".encode("latin-1"))
    cases = [(["-f", tmp_path / "bin"], "bin is a binary file"),
             (["-f", tmp_path / "latin1"], "latin1 is not UTF-8 text (byte 0xe9 at offset 3)"),
             (["-f", tmp_path], "is a directory, not a text file"),
             (["-p", "x", "--stats-json", tmp_path], "--stats-json: " + str(tmp_path) + " is a directory"),
             (["-p", "x", "--stats-json", tmp_path / "no" / "s.json"], "folder " + str(tmp_path / "no")),
             (["-p", "x", "--trace-routing", tmp_path / "no" / "t.jsonl"], "--trace-routing: folder")]
    for flags, message in cases:
        line = one_line_error(capsys, generate_main, ["-m", m, *flags])
        assert message in line, line
        assert "load:" not in line
    assert not list(tmp_path.glob("**/*.tmp"))


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "'architectures' ['LlamaForCausalLM'] is not supported"),
    ({"architectures": "MixtralForCausalLM"}, "'architectures' must be a list"),
    ({"num_key_value_heads": 0}, "'num_key_value_heads' must be a positive integer, got 0"),
    ({"num_key_value_heads": -2}, "'num_key_value_heads' must be a positive integer, got -2"),
    ({"head_dim": -16}, "'head_dim' must be a positive integer, got -16"),
    ({"num_attention_heads": 5}, "'num_attention_heads' (5) does not divide"),
])
def test_bad_config_is_one_line(model_copy, change, message, capsys):
    rewrite_config(model_copy, **change)
    line = one_line_error(capsys, generate_main, ["-m", model_copy, "-p", "x"])
    assert message in line and "config.json" in line


def test_files_named_in_one_line(mixtral_ref, tmp_path, capsys):
    src = mixtral_ref[1]

    def fresh(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    d = fresh("list")
    (d / "config.json").write_text("[1, 2]")
    assert "config.json: must hold a JSON object" in one_line_error(capsys, generate_main, ["-m", d, "-p", "x"])
    d = fresh("tok")
    (d / "tokenizer.model").unlink()
    line = one_line_error(capsys, generate_main, ["-m", d, "-p", "x", "-t", 1])
    assert "tokenizer.model" in line
    d = fresh("trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "model.safetensors: not a readable safetensors file" in one_line_error(
        capsys, generate_main, ["-m", d, "-p", "x", "-t", 1])
    d = fresh("offsets")
    raw = (d / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    del header["model.norm.weight"]["data_offsets"]
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    (d / "model.safetensors").write_bytes(raw[:8] + new + raw[8 + n :])
    line = one_line_error(capsys, generate_main, ["-m", d, "-p", "x", "-t", 1])
    assert "model.safetensors: not a readable safetensors file" in line and "data_offsets" in line
    d = fresh("store")
    (d / "model.safetensors").rename(d / "dense.safetensors")
    assert "quantized store without its manifest.json" in one_line_error(
        capsys, generate_main, ["-m", d, "-p", "x", "-t", 1])
    (tmp_path / "plain").write_text("x")
    assert "is a file, neither a model folder nor a GGUF file" in one_line_error(capsys, generate_main,
                                                             ["-m", tmp_path / "plain", "-p", "x"])


def test_quantize_offers_every_quantization_method(capsys):
    """tools/quantize_experts.py spells its --method choices out (so --help needs no torch): they must be
    offload.quant.METHODS."""
    from offload.quant import METHODS

    with pytest.raises(SystemExit) as e:
        qe.main(["--help"])
    assert e.value.code == 0
    assert "{" + ",".join(METHODS) + "}" in capsys.readouterr().out


# ---- issue 25, item 6: the safetensors faults that named no tensor or file -----------------------------------
def _rewrite_header(file: Path, edit) -> None:
    """Edit a safetensors header in place (padded to its old length: the data does not move)."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    file.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n :])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["model.norm.weight"].__setitem__("data_offsets", [0, 7]),
     "tensor 'model.norm.weight': shape [64] in F32 takes 256 bytes, its data_offsets span 7"),
    (lambda h: h["model.norm.weight"].__setitem__("data_offsets", [10**9, 10**9 + 256]),
     "tensor 'model.norm.weight': data_offsets [1000000000, 1000000256] fall outside"),
    (lambda h: h["model.norm.weight"].__setitem__("dtype", "Q9"), "tensor 'model.norm.weight': unknown dtype 'Q9'"),
    (lambda h: h["model.norm.weight"].__setitem__("shape", [2, 2]),
     "tensor 'model.norm.weight': shape [2, 2] in F32 takes 16 bytes"),
])
def test_safetensors_faults_name_the_tensor(model_copy, edit, message, capsys):
    _rewrite_header(model_copy / "model.safetensors", edit)
    line = one_line_error(capsys, generate_main, ["-m", model_copy, "-p", "x", "-t", 1])
    assert "model.safetensors: not a readable safetensors file" in line and message in line


def test_a_shard_that_is_a_directory(model_copy, capsys):
    f = model_copy / "model.safetensors"
    f.rename(model_copy / "shard-1.safetensors")
    index = {"weight_map": {n: "shard-1.safetensors" for n in load_file(model_copy / "shard-1.safetensors")}}
    index["weight_map"]["model.norm.weight"] = "sub"
    (model_copy / "sub").mkdir()
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    line = one_line_error(capsys, generate_main, ["-m", model_copy, "-p", "x", "-t", 1])
    assert f"{model_copy / 'sub'}: is a directory, not a safetensors file" in line


@pytest.fixture(scope="module")
def small_store(mixtral_ref, tmp_path_factory):
    dst = tmp_path_factory.mktemp("store") / "q4"
    assert qe.main([str(mixtral_ref[1]), str(dst), "--bits", "4", "--method", "rtn"]) == 0
    return dst


@pytest.mark.parametrize("target, edit, message", [
    ("experts", lambda h: h["layers.0.experts.1"].pop("data_offsets"),
     "tensor 'layers.0.experts.1' has data_offsets None, not [begin, end]"),
    ("dense.safetensors", lambda h: h["model.norm.weight"].__setitem__("dtype", "X1"),
     "tensor 'model.norm.weight': unknown dtype 'X1'"),
])
def test_store_header_faults_name_file_and_tensor(small_store, tmp_path, target, edit, message, capsys):
    d = tmp_path / "q"
    shutil.copytree(small_store, d)
    file = next(d.glob("experts-*.safetensors")) if target == "experts" else d / target
    _rewrite_header(file, edit)
    line = one_line_error(capsys, generate_main, ["-m", d, "-p", "x", "-t", 1, "--experts-per-layer", 2])
    assert str(file) in line and message in line
