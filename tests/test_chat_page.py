"""The chat page at / in headless Chromium (driven over the DevTools protocol): a streamed greedy reply."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from serving import running_server

websocket = pytest.importorskip("websocket", reason="websocket-client is a dev dependency")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parent / "artifacts"


class DevTools:
    def __init__(self, ws_url: str):
        self.ws, self.n = websocket.create_connection(ws_url, timeout=30), 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                return msg.get("result", {})

    def js(self, expr: str):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_chat_page_streams_a_reply(tmp_path):
    from mixtral_lite.generation.decode import generate
    from mixtral_lite.runtime.device import set_threads
    from mixtral_lite.runtime.load import open_session
    from mixtral_lite.runtime.plan import plan_load
    from mixtral_lite.serve.server import build_parser
    plan = plan_load(build_parser().parse_args(["-t", "1"]), show_cache_on_cpu=True)  # as the server does
    set_threads(plan.threads)
    session = open_session(plan)
    ids = session.tok.encode_chat([{"role": "user", "content": "Who is Emma?"}])
    expected = session.tok.decode(generate(session.model, [ids], 12, window=session.window,
                                           eos_id=session.tok.eos_id)[0])
    with running_server(tmp_path) as url:
        browser = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                                    "--remote-debugging-port=0",
                                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,700", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = tmp_path / "profile" / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not port_file.is_file() or not port_file.read_text().strip():
                assert time.monotonic() < deadline and browser.poll() is None, "chromium did not start"
                time.sleep(0.2)
            port = port_file.read_text().split()[0]
            import httpx
            page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                        if t["type"] == "page")
            dt = DevTools(page["webSocketDebuggerUrl"])
            dt.call("Page.enable")
            dt.call("Page.navigate", url=url + "/?temperature=0&max_tokens=12")
            deadline = time.monotonic() + 30
            while dt.js("document.readyState + document.body?.dataset.state") != "completeidle":
                assert time.monotonic() < deadline, "the page did not load"
                time.sleep(0.1)
            dt.js("document.getElementById('input').value = 'Who is Emma?';"
                  "document.getElementById('form').requestSubmit()")
            deadline = time.monotonic() + 30
            while dt.js("document.body.dataset.state + !!document.getElementById('figures').dataset.tokens") \
                    != "idletrue":
                assert time.monotonic() < deadline, "no reply"
                time.sleep(0.1)
            reply = dt.js("document.querySelector('.msg.assistant').textContent")
            figures = dt.js("document.getElementById('figures').textContent")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "chat_page.png"
            shot.write_bytes(base64.b64decode(dt.call("Page.captureScreenshot", format="png")["data"]))
            print(f"screenshot: {shot}")
            assert reply == expected
            assert "tokens/s: " in figures and "(12 tokens)" in figures and "hit rate" in figures
        finally:
            browser.terminate()
            browser.wait(timeout=15)
