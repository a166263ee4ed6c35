"""The front door in a real process: --help speed, closed or full standard streams, stdin, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

GEN = [sys.executable, "-m", "mixtral_lite.generate"]
ROOT = Path(__file__).resolve().parents[1]


def _sh(command: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, **kw)


def test_help_and_version_answer_before_torch_loads():
    best = min(_timed(GEN + ["--help"]) for _ in range(2))
    assert best < 1.0, best
    for module in ("mixtral_lite.generate", "mixtral_lite.perplexity"):
        out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith("mixtral-lite 0."), out
    bad = subprocess.run(GEN + ["-b", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "-b/--batch-size: 0 is out of range" in bad.stderr


def test_a_run_imports_neither_quantizer_server_nor_compiler(mixtral_q_ref, tmp_path):
    """Start-up (issue 23): reading a 4-bit store imports no hqq (4 s, it pulls in torch's compiler), no
    server packages, no transformers and no torch._dynamo (which nn.Embedding's init on the meta device
    would import: 1.3 s); `python -X importtime` shows the rest. Not a timed test: the modules are the
    property."""
    sys.path.insert(0, str(ROOT / "tools"))
    from store_converter import convert

    from mixtral_lite.model.qstore import DenseSettings
    from offload.quant import QuantSpec

    store = convert(mixtral_q_ref[1], tmp_path / "q4", QuantSpec(4, 64, 1, 8),
                    DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8), progress=False, method="rtn")
    code = ("import sys; from mixtral_lite.cli.generate import main; "
            f"main(['-m', {str(store)!r}, '-p', 'hi', '-n', '1', '-t', '1', '-s', '0']); "
            "print('loaded:', *[m for m in ('hqq', 'fastapi', 'uvicorn', 'prometheus_client', 'transformers', "
            "'torch._dynamo', 'torch._inductor') if m in sys.modules], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "loaded:", out.stderr


def _timed(argv) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - t0


def test_standard_streams_closed_full_and_stdin(mixtral_ref):
    m = str(mixtral_ref[1])
    base = " ".join([*GEN, "-m", m, "-n", "4", "-t", "1", "-s", "1", "--ignore-eos"])
    closed_err = _sh(f"exec {base} -p Hello 2>&-")  # figures go nowhere, never into the text
    assert closed_err.returncode == 0 and closed_err.stdout.strip()
    assert "decode" not in closed_err.stdout and "load:" not in closed_err.stdout
    closed_out = _sh(f"exec {base} -p Hello >&-")
    assert closed_out.returncode == 2 and "error: stdout is closed" in closed_out.stderr
    full = _sh(f"exec {base} -p Hello >/dev/full")
    assert full.returncode == 2 and "error: writing the text to stdout: No space left" in full.stderr
    for p in (closed_out, full):
        assert "Traceback" not in p.stderr, p.stderr
    piped = _sh(f"exec {base} -f -", input="Hello")
    assert piped.returncode == 0 and piped.stdout == closed_err.stdout  # same prompt, same seed


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_files_and_prints_figures(mixtral_ref, tmp_path, sig, status):
    stats, trace = tmp_path / "s.json", tmp_path / "t.jsonl"
    proc = subprocess.Popen([*GEN, "-m", str(mixtral_ref[1]), "-p", "Hello", "-n", "100000", "--ignore-eos",
                             "-t", "1", "-c", "64", "--stats-json", str(stats), "--trace-routing", str(trace)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(64)  # generation is under way
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == status, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "decode:" in err and f"error: interrupted by {sig.name}" in err
    figures = json.loads(stats.read_text())
    assert figures["interrupted"] == sig.name and figures["generated_tokens"] > 0
    assert trace.is_file() and trace.read_text().count("\n") > 0
    assert not list(tmp_path.glob("*.tmp"))
