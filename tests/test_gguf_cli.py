"""`generate -m FILE.gguf`: the text, the plan, the converted-experts tool, and one line for every bad file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from refs import save_reference
from test_errors import one_line_error

from mixtral_lite.cli.generate import main
from mixtral_lite.generation.decode import generate
from mixtral_lite.model.gguf.checkpoint import GGUFCheckpoint
from mixtral_lite.model.source import open_tokenizer
from mixtral_lite.runtime.load import load_model

pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gguf_quantize import write  # noqa: E402

_spec = importlib.util.spec_from_file_location("gguf_prepack", ROOT / "tools" / "gguf_prepack.py")
prepack_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepack_tool)

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=2)


@pytest.fixture(scope="module")
def q4k(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf_cli")
    _, src = save_reference(root / "ref", "mixtral", seed=6, **SHAPE)
    return write(src, root / "model-Q4_K.gguf", "Q4_K", {"blk.1.ffn_down_exps.weight": "Q6_K"})


def test_generate_from_a_gguf(q4k, tmp_path, capsys):
    stats = tmp_path / "s.json"
    main([str(a) for a in ("-m", q4k, "-p", "It is a truth", "-n", 8, "--temperature", 0, "--ignore-eos",
                           "--stats-json", stats)])
    out = capsys.readouterr()
    tok = open_tokenizer(q4k)
    want = generate(load_model(q4k), [tok.encode("It is a truth")], 8, window=4096)[0]
    s = json.loads(stats.read_text())
    assert s["generated_ids"] == want and out.out == tok.decode(want) + "\n"
    assert "int4 fused int4 kernel (Q4_K)" in out.err and "Q4_K/Q6_K at each load" in out.err
    assert "model-Q4_K.gguf" in out.err and "kernels:" in out.err


def test_chat_uses_the_mistral_format(q4k, tmp_path, capsys):
    stats = tmp_path / "s.json"
    main([str(a) for a in ("-m", q4k, "-p", "Hi", "--chat", "-n", 2, "--stats-json", stats)])
    tok = open_tokenizer(q4k)
    assert json.loads(stats.read_text())["prompt_tokens"] == len(tok.encode_chat([{"role": "user", "content": "Hi"}]))


def test_dry_run_plans_the_gguf(q4k, tmp_path, capsys):
    ckpt = GGUFCheckpoint(q4k)
    slot = ckpt.ggml_codec("cpu").slot_layout.nbytes
    f = tmp_path / "plan.json"
    out = main([str(a) for a in ("-m", q4k, "--dry-run", "--stats-json", f)]) or capsys.readouterr().out
    plan = json.loads(f.read_text())
    assert plan["store"] == "mmap" and plan["expert_slot_bytes"] == slot and plan["experts_per_layer"] == 4
    assert plan["device_expert_bytes"] == 2 * 4 * slot and plan["mmapped_bytes"] == 2 * 4 * ckpt.expert_bytes
    assert plan["dense_bytes"] == ckpt.dense_device_bytes(torch.float32) and "no model-Q4_K.gguf.int4" in out
    main([str(a) for a in ("-m", q4k, "--dry-run", "--experts-per-layer", 2, "--store", "ram", "--stats-json", f)])
    plan = json.loads(f.read_text())
    assert plan["device_expert_bytes"] == 2 * 2 * slot and plan["host_expert_bytes"] == 2 * 4 * ckpt.expert_bytes


def test_prepack_tool_then_read_in_place(q4k, tmp_path, capsys):
    copy = tmp_path / q4k.name
    copy.write_bytes(q4k.read_bytes())
    assert prepack_tool.main([str(copy)]) == 0
    assert "wrote" in capsys.readouterr().err
    assert prepack_tool.main([str(copy)]) == 0 and "is current; nothing to do" in capsys.readouterr().err
    f = tmp_path / "plan.json"
    main([str(a) for a in ("-m", copy, "--dry-run", "--stats-json", f)])
    plan = json.loads(f.read_text())
    assert plan["codec"] == "prepacked" and f"read in place from {copy.name}.int4-cpu" in plan["note"]
    with torch.inference_mode():
        ids = torch.tensor([[1, 415, 2936, 9060]])
        assert torch.equal(load_model(copy)(ids), load_model(q4k)(ids))


def test_experts_too_big_for_ram_are_refused_with_the_way_out(q4k, monkeypatch, capsys):
    import psutil

    class Tiny:
        available, total = 1 << 20, 1 << 40
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny)
    line = one_line_error(capsys, main, ["-m", q4k, "-p", "Hi", "-n", 1])
    assert "more than the 0.0 GiB of RAM available" in line and "tools/gguf_prepack.py" in line
    assert "--experts-per-layer K" in line


def _corrupt(q4k: Path, tmp_path: Path, how) -> Path:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(how(q4k.read_bytes()))
    return bad


@pytest.mark.parametrize("how,message", [
    (lambda b: b[: len(b) // 3], r"bad\.gguf: tensor '.*' ends at byte \d+ .*truncated download"),
    (lambda b: b"GGML" + b[4:], r"bad\.gguf: not a GGUF file"),
    (lambda b: b.replace(b"llama", b"qwen2", 1), r"bad\.gguf: architecture 'qwen2'"),
])
def test_bad_gguf_is_one_line(q4k, tmp_path, capsys, how, message):
    import re

    line = one_line_error(capsys, main, ["-m", _corrupt(q4k, tmp_path, how), "-p", "Hi", "-n", 1])
    assert re.search(message, line), line


def test_a_file_that_is_no_model_is_named(tmp_path, capsys):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 64)
    line = one_line_error(capsys, main, ["-m", f, "-p", "Hi"])
    assert "weights.bin is a file, neither a model folder nor a GGUF file" in line


def test_chat_template_of_another_format_is_one_line(tmp_path, capsys):
    _, src = save_reference(tmp_path / "ref", "mixtral", seed=7, **SHAPE)
    chatml = {"tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}..."}
    out = write(src, tmp_path / "chatml.gguf", "Q4_0", strings=chatml)
    line = one_line_error(capsys, main, ["-m", out, "-p", "Hi", "--chat", "-n", 1])
    assert "chatml.gguf: its chat template" in line and "not the Mistral [INST] format" in line


def test_perplexity_of_a_gguf(q4k, tmp_path, capsys):
    from mixtral_lite.cli import perplexity

    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune.")
    perplexity.main([str(a) for a in ("-m", q4k, "-f", text, "-c", 16, "--json", "--no-progress")])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tokens"] > 10 and 1 < res["perplexity"] < 1e6
