"""Helpers for the server tests: start `python -m mixtral_lite.server` on 127.0.0.1, always stop it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

START_TIMEOUT_S = 90


@contextmanager
def running_server(tmp_path: Path, *flags: str):
    """Yield the base URL of a server started with these flags (port 0: the server picks and prints one)."""
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mixtral_lite.server", "--port", "0", "-t", "1", *flags],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = _wait_ready(proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _wait_ready(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        if url is None:
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())
            url = m and f"http://127.0.0.1:{m.group(1)}"
        if url:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{log.read_text()}")


def metric(url: str, name: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextmanager
def serving_app(app):
    """Yield the base URL of an app (serve.server.create_app) served by uvicorn in a thread on 127.0.0.1."""
    import socket
    import threading

    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
