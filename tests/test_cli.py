"""`python -m mixtral_lite.generate` end to end on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mixtral_lite.generate import generate, main
from mixtral_lite.model import load_model
from mixtral_lite.tokenizer import Tokenizer

KEYS = {"prompt_tokens", "generated_tokens", "generated_ids", "load_s", "ttft_s", "decode_tokens_per_s",
        "peak_rss_bytes", "peak_device_bytes"}


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
