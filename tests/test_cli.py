"""`python -m mixtral_lite.generate` end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_lite.cli.generate import main
from mixtral_lite.generation.decode import generate
from mixtral_lite.model.tokenizer import Tokenizer
from mixtral_lite.runtime.load import load_model

KEYS = {"prompt_tokens", "generated_tokens", "generated_ids", "load_s", "ttft_s", "decode_tokens_per_s",
        "peak_rss_bytes", "peak_device_bytes", "disk_read_bytes"}


def run_cli(capsys, *argv):
    main([str(a) for a in argv])
    return capsys.readouterr()


def test_stdout_is_the_continuation_and_stats_json(mixtral_ref, tmp_path, capsys):
    _, path = mixtral_ref
    stats_file = tmp_path / "stats.json"
    out = run_cli(capsys, "-m", path, "-p", "It is a truth", "-n", 12, "--temperature", 0, "--ignore-eos",
                  "--stats-json", stats_file)
    stats = json.loads(stats_file.read_text())
    assert KEYS <= set(stats)
    tok = Tokenizer.from_dir(path)
    ids = tok.encode("It is a truth")
    expected = generate(load_model(path), [ids], 12, window=4096)[0]
    assert stats["generated_ids"] == expected and stats["generated_tokens"] == 12
    assert stats["prompt_tokens"] == len(ids)
    assert out.out == tok.decode(expected) + "\n"
    assert "tokens/s" in out.err and "peak RSS" in out.err


def test_chat_and_prompt_file(mixtral_ref, tmp_path, capsys):
    _, path = mixtral_ref
    (tmp_path / "p.txt").write_text("Tell me a story")
    stats_file = tmp_path / "s.json"
    run_cli(capsys, "-m", path, "-f", tmp_path / "p.txt", "--chat", "-n", 3, "-s", 7, "--stats-json", stats_file)
    tok = Tokenizer.from_dir(path)
    expected = tok.encode_chat([{"role": "user", "content": "Tell me a story"}])
    assert json.loads(stats_file.read_text())["prompt_tokens"] == len(expected)


def test_sampling_is_seeded(mixtral_ref, tmp_path, capsys):
    _, path = mixtral_ref
    runs = []
    for seed in (1, 1, 2):
        f = tmp_path / f"s{len(runs)}.json"
        run_cli(capsys, "-m", path, "-p", "Once", "-n", 8, "--temperature", 1.5, "--top-k", 0, "--top-p", 1,
                "-s", seed, "--ignore-eos", "--stats-json", f)
        runs.append(json.loads(f.read_text())["generated_ids"])
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("argv, message", [
    (["-p", ""], "the prompt is empty"),
    (["-p", "x", "-f", "y"], "either -p/--prompt or -f/--file"),
    (["-f", "/nonexistent/prompt.txt"], "-f/--file: /nonexistent/prompt.txt does not exist"),
    (["-p", "x", "-n", "-1"], "-n/--max-new-tokens: -1 is out of range: must be >= 0"),
    (["-p", "x", "--top-p", "0"], "--top-p"),
    (["-p", "x", "-t", "0"], "-t/--threads: 0 is out of range: must be >= 1"),
    (["-p", "x", "--temperature", "-1"], "--temperature"),
])
def test_bad_input(mixtral_ref, argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(["-m", str(mixtral_ref[1]), *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_missing_model_folder(tmp_path):
    with pytest.raises(SystemExit, match="nope does not exist"):
        main(["-m", str(tmp_path / "nope"), "-p", "x"])
    with pytest.raises(SystemExit, match="is not a model folder"):
        main(["-m", str(tmp_path), "-p", "x"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu(mixtral_ref):
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device"):
        main(["-m", str(mixtral_ref[1]), "-p", "x", "--device", "cuda"])


def test_module_entry_point(mistral_ref):
    _, path = mistral_ref
    proc = subprocess.run([sys.executable, "-m", "mixtral_lite.generate", "-m", str(path), "-p", "Hello",
                           "-n", "4", "--temperature", "0", "--ignore-eos"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.from_dir(path)
    expected = generate(load_model(path), [tok.encode("Hello")], 4, window=4096)[0]
    assert proc.stdout == tok.decode(expected) + "\n"
    assert "decode: 4 tokens" in proc.stderr


def test_closed_stdout_stops_quietly(mixtral_ref):
    """`mixtral-lite ... | head -c 1`: the reader leaves early; no traceback, a non-zero exit.
    (20000 tokens are more than a pipe buffer holds, so the writer must meet the closed pipe.)"""
    _, path = mixtral_ref
    proc = subprocess.Popen([sys.executable, "-m", "mixtral_lite.generate", "-m", str(path), "-p", "Hello",
                             "-n", "20000", "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_defaults_seed_threads_resident_on_cpu(capsys):
    """The shipped model: resident on the CPU (offloading there only costs time), a random printed seed,
    threads chosen and printed; an explicit K offloads and shows the cache figures; --device-memory works."""
    from mixtral_lite import default_model_path

    out = run_cli(capsys, "-p", "Emma", "-n", 3)
    assert "seed: " in out.err and "threads: " in out.err and "experts:" not in out.err
    assert "prompt eval:" in out.err and "weights + KV cache + expert slots" in out.err
    out = run_cli(capsys, "-p", "Emma", "-n", 3, "-t", 1, "-s", 5, "--experts-per-layer", 4)
    assert "seed: " not in out.err and "threads: " not in out.err
    assert "experts: hit rate" in out.err and "MiB per token" in out.err
    assert "uses served from a slot with no transfer this token" in out.err and " wasted, " in out.err
    assert "bus per token (MiB): demand misses " in out.err
    out = run_cli(capsys, "-m", default_model_path(), "-p", "Emma", "-n", 2, "-t", 1, "--device-memory", 1)
    assert "-> 8 experts per layer" in out.err and "experts: hit rate" in out.err


def test_window_sizes_and_warnings(mixtral_ref, tmp_path, capsys):
    _, path = mixtral_ref
    f = tmp_path / "s.json"
    run_cli(capsys, "-m", path, "-p", "Hello", "-n", 3, "-c", 100_000_000, "-t", 1, "--stats-json", f)
    assert json.loads(f.read_text())["window"] == 3 + 2  # what the text needs, not 100M slots (38 GB)
    out = run_cli(capsys, "-m", path, "-p", "Hello there", "-n", 6, "-c", 4, "-t", 1)
    assert "exceed the KV window (-c 4) of a model without a sliding window" in out.err
    small = tmp_path / "m"
    import shutil

    from refs import rewrite_config

    shutil.copytree(path, small)
    rewrite_config(small, max_position_embeddings=4)
    out = run_cli(capsys, "-m", small, "-p", "Hello", "-n", 6, "-t", 1)
    assert "pass the model's trained context (max_position_embeddings 4)" in out.err


def test_dry_run_needs_only_config(mixtral_ref, tmp_path, capsys):
    only = tmp_path / "cfg"
    only.mkdir()
    (only / "config.json").write_bytes((mixtral_ref[1] / "config.json").read_bytes())
    f = tmp_path / "plan.json"
    out = run_cli(capsys, "-m", only, "--dry-run", "--experts-per-layer", 2, "-c", 256, "--stats-json", f)
    plan = json.loads(f.read_text())
    assert plan["experts_per_layer"] == 2 and plan["store"] == "ram" and plan["window"] == 256
    assert plan["expert_slot_bytes"] == 3 * 64 * 96 * 4 and plan["kv_cache_bytes"] == 2 * 3 * 256 * 2 * 16 * 4
    assert "expert slots" in out.out and "KV cache" in out.out and "host RAM" in out.out


def test_model_vocab_larger_than_tokenizer(mixtral_ref, tmp_path, capsys):
    """Padded vocabulary: the ids without a tokenizer piece are never sampled (they were: a crash mid-run)."""
    import shutil

    from refs import rewrite_config
    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(mixtral_ref[1], big)
    t = load_file(big / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t[name] = torch.cat([t[name], torch.full((64, t[name].shape[1]), 5.0)])  # padded rows would win
    save_file(t, big / "model.safetensors", metadata={"format": "pt"})
    rewrite_config(big, vocab_size=32064)
    f = tmp_path / "s.json"
    out = run_cli(capsys, "-m", big, "-p", "Hi", "-n", 8, "--temperature", 0, "--ignore-eos", "-t", 1,
                  "--stats-json", f)
    assert "ids without a piece are never sampled" in out.err
    assert max(json.loads(f.read_text())["generated_ids"]) < 32000


def test_chat_says_once_what_a_model_without_chat_training_is(mixtral_ref, tmp_path, capsys):
    """--chat on the shipped model (no chat template) says so in one note; an Instruct-like folder does not;
    the quantizer carries tokenizer_config.json into the store, so the store knows too."""
    import shutil

    from mixtral_lite.runtime.about import chat_note, context_warning, has_chat_template

    out = run_cli(capsys, "-p", "Who is Emma?", "-n", 1, "-t", 1, "-s", 0, "--chat")
    assert out.err.count("note: the shipped austen-mixtral") == 1 and "not on conversations" in out.err
    assert "note: the shipped" not in run_cli(capsys, "-p", "Emma", "-n", 1, "-t", 1, "-s", 0).err
    _, path = mixtral_ref
    src = tmp_path / "instruct"
    shutil.copytree(path, src)
    assert "no chat template" in chat_note(src) and not has_chat_template(src)
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}[INST] ..."}))
    assert chat_note(src) is None
    assert "note:" not in run_cli(capsys, "-m", src, "-p", "Hi", "-n", 1, "-t", 1, "-s", 0, "--chat").err
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from store_converter import convert

    from offload.quant import QuantSpec

    store = convert(src, tmp_path / "q4", QuantSpec(4, 32, 1, 8), progress=False, method="rtn")
    assert has_chat_template(store) and chat_note(store) is None
    assert context_warning(512, 512) is None and "past the 512" in context_warning(513, 512)


def test_chat_repl_warns_once_past_the_trained_context(capsys):
    """The shipped model was trained on 512-token windows: a conversation past them gets one warning, and
    /reset (a new conversation) rearms it."""
    from mixtral_lite.cli.chat import Chat, build_parser
    from mixtral_lite.runtime.load import open_session
    from mixtral_lite.runtime.plan import plan_load

    args = build_parser().parse_args(["-t", "1", "-n", "2", "--temperature", "0"])
    chat = Chat(open_session(plan_load(args)), args)
    chat.answer("Emma " * 100, write=lambda s: None)
    assert "warning:" not in capsys.readouterr().err  # ~110 tokens: within the 512
    chat.answer("Harriet " * 450, write=lambda s: None)
    chat.answer("And then?", write=lambda s: None)
    err = capsys.readouterr().err
    assert err.count("warning: the conversation is") == 1 and "past the 512 the model was trained on" in err
    chat.reset()
    chat.answer("Knightley " * 520, write=lambda s: None)
    assert capsys.readouterr().err.count("warning: the conversation is") == 1
