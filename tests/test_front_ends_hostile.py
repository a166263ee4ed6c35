"""The server's and the chat's start-up and the chat's input under hostile conditions (issue 25): each fault is
one line `error: ...` naming the flag, file or field, a non-zero status, no traceback; the chat keeps its
conversation through a bad line or a failed answer. Real processes (their stdin, stdout and exit status)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from refs import rewrite_config

from mixtral_lite.cli import chat as chat_cli
from mixtral_lite.serve import server as server_cli

TIMEOUT_S = 120


def run(module: str, *argv, stdin: bytes = b"", shell_suffix: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"mixtral_lite.{module}", *[str(a) for a in argv]]
    if shell_suffix:  # e.g. ">&-": stdout closed
        line = " ".join(f"'{c}'" for c in cmd) + " " + shell_suffix
        return subprocess.run(["bash", "-c", line], input=stdin, capture_output=True, timeout=TIMEOUT_S)
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=TIMEOUT_S)


def one_line(p: subprocess.CompletedProcess, status: int = 2) -> str:
    err = p.stderr.decode(errors="replace")
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert p.returncode == status and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def copy(mixtral_ref, tmp_path):
    def make(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(mixtral_ref[1], d)
        return d
    return make


# ---- server start-up (in this process where it fails before loading: the same main a process runs) -------
def main_error(capsys, main, argv, status: int = 2) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert e.value.code == status and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_server_bad_config_and_tokenizer(copy, capsys):
    d = copy("cfg")
    (d / "config.json").write_text("[1, 2]")
    assert "config.json: must hold a JSON object" in main_error(capsys, server_cli.main, ["-m", d, "--port", 0])
    d = copy("vocab")
    rewrite_config(d, vocab_size=31000)
    line = main_error(capsys, server_cli.main, ["-m", d, "--port", 0, "-t", 1])
    assert "tokenizer.model has 32000 pieces but config.json's vocab_size is 31000" in line


def test_server_truncated_checkpoint(copy):
    """Found by the worker thread while the port is open: the process exits with the one line."""
    d = copy("trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    line = one_line(run("server", "-m", d, "--port", 0, "-t", 1))
    assert "model.safetensors: not a readable safetensors file" in line


def test_server_address_errors(mixtral_ref, capsys):
    m = mixtral_ref[1]
    assert "--port: 70000 is out of range" in main_error(capsys, server_cli.main, ["-m", m, "--port", 70000])
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = main_error(capsys, server_cli.main, ["-m", m, "--port", port, "-t", 1])
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in line
    assert "--host no-such-host.invalid: not an address" in main_error(
        capsys, server_cli.main, ["-m", m, "--host", "no-such-host.invalid", "--port", 0, "-t", 1])
    assert "--host 192.0.2.1: not an address of this machine" in main_error(
        capsys, server_cli.main, ["-m", m, "--host", "192.0.2.1", "--port", 0, "-t", 1])


def test_server_refuses_kv_caches_beyond_memory(mixtral_ref, capsys):
    line = main_error(capsys, server_cli.main, ["-m", mixtral_ref[1], "--port", 0, "-c", 2_000_000_000, "-t", 1])
    assert "-c/--ctx-size and --max-batch: 5 KV caches of a 2000000000-token window need" in line


# ---- chat ----------------------------------------------------------------------------------------------
CHAT = ("-t", "1", "--temperature", "0", "-n", "8")


def test_chat_bad_config_truncated_checkpoint_closed_stdout(copy, mixtral_ref, capsys):
    d = copy("cfg")
    (d / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in main_error(capsys, chat_cli.main, ["-m", d, *CHAT])
    d = copy("trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "model.safetensors: not a readable safetensors file" in main_error(capsys, chat_cli.main,
                                                                             ["-m", d, *CHAT])
    line = one_line(run("chat", "-m", mixtral_ref[1], *CHAT, stdin=b"hi\n", shell_suffix=">&-"))
    assert "stdout is closed" in line


def test_chat_survives_a_non_utf8_line_and_warns_on_context(mixtral_ref):
    p = run("chat", "-m", mixtral_ref[1], *CHAT, "-c", "40",
            stdin=b"caf\xe9 au lait\n" + b"Tell me about the weather in Bath today\n" + b"And tomorrow?\n/exit\n")
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "error: that line is not UTF-8 text (byte 0xe9 at offset 3); not sent" in err
    assert err.count("exceed the KV window (-c 40)") == 1  # once per conversation, not per turn
    assert p.stdout.decode().count("> ") >= 3  # both questions answered, the prompt back each time


def test_chat_on_a_padded_vocabulary(copy):
    """The chat died mid-answer on a vocabulary padded past its tokenizer (an id without a piece)."""
    import torch
    from safetensors.torch import load_file, save_file

    big = copy("big")
    t = load_file(big / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t[name] = torch.cat([t[name], torch.full((64, t[name].shape[1]), 5.0)])
    save_file(t, big / "model.safetensors", metadata={"format": "pt"})
    rewrite_config(big, vocab_size=32064)
    p = run("chat", "-m", big, "-t", "1", "--temperature", "0", "-n", "20", "--ignore-eos",
            stdin=b"Hello\n/stats\n/exit\n")
    err = p.stderr.decode()
    assert p.returncode == 0 and "error" not in err and "ids without a piece are never sampled" in err, err
    assert "last answer: 20 tokens" in p.stdout.decode()


def test_chat_interrupted_while_loading(mixtral_ref, monkeypatch, capsys):
    from mixtral_lite.runtime import load

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(load, "open_session", interrupted)
    with pytest.raises(SystemExit) as e:
        chat_cli.main(["-m", str(mixtral_ref[1]), *CHAT])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "error: interrupted (SIGINT)" in err and "Traceback" not in err


def test_chat_answer_that_fails_keeps_the_conversation(mixtral_ref, monkeypatch, capsys):
    """A failed answer is one line; the turns before it stay, and the next question is answered."""
    import io

    from mixtral_lite.generation import session as session_module

    calls = [0]
    real = session_module.Session._sample

    def flaky(self, g, last, step_no):
        calls[0] += 1
        if calls[0] == 12:
            raise RuntimeError("boom")
        return real(self, g, last, step_no)
    monkeypatch.setattr(session_module.Session, "_sample", flaky)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one\ntwo\nthree\n/exit\n")))
    chat_cli.main(["-m", str(mixtral_ref[1]), *CHAT, "-s", "1"])
    out = capsys.readouterr()
    assert out.err.count("error:") == 1 and "RuntimeError: boom" in out.err and "conversation so far is kept" in out.err
    assert out.out.count("> ") == 4  # three questions and the /exit


# ---- generate: sizes that cannot be allocated ------------------------------------------------------------
def test_generate_refuses_a_kv_cache_beyond_memory(mixtral_ref, tmp_path, capsys):
    from mixtral_lite.cli.generate import main as generate_main

    f = tmp_path / "s.json"
    with pytest.raises(SystemExit) as e:
        generate_main([str(a) for a in ("-m", mixtral_ref[1], "-p", "hi", "-n", 100_000_000, "-c", 100_000_000,
                                        "-t", 1, "--stats-json", f)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "load:" not in err and not f.exists()
    assert "error: -c/--ctx-size and -n/--max-new-tokens: the KV cache of a 100000000-token window needs" in err
