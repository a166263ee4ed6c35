"""The chat page at / in headless Chromium (driven over the DevTools protocol): a streamed greedy reply;
Stop frees the server at once and the next question starts; New chat cancels; model text is never HTML;
the view follows the stream until the user scrolls up; no request of the page is a 404."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from serving import metric, running_server

websocket = pytest.importorskip("websocket", reason="websocket-client is a dev dependency")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parent / "artifacts"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


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

    def wait(self, expr: str, want, timeout: float = 30, what: str = ""):
        """Poll `expr` until it equals `want`; return the seconds it took."""
        t0 = time.monotonic()
        while (got := self.js(expr)) != want:
            assert time.monotonic() - t0 < timeout, f"{what or expr}: {got!r} after {timeout} s"
            time.sleep(0.05)
        return time.monotonic() - t0

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait("document.readyState + document.body?.dataset.state + document.body?.dataset.ready",
                  "completeidle1", what="the page did not load")

    def ask(self, text: str) -> None:
        self.js(f"document.getElementById('input').value = {json.dumps(text)};"
                "document.getElementById('form').requestSubmit()")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(DevTools of one Chromium tab, the server's URL); one server and one browser for the module."""
    tmp = tmp_path_factory.mktemp("chat_page")
    with running_server(tmp) as url:
        browser = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                                    "--remote-debugging-port=0", f"--user-data-dir={tmp / 'profile'}",
                                    "--window-size=900,700", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = tmp / "profile" / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not port_file.is_file() or not port_file.read_text().strip():
                assert time.monotonic() < deadline and browser.poll() is None, "chromium did not start"
                time.sleep(0.2)
            port = port_file.read_text().split()[0]
            tab = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                       if t["type"] == "page")
            dt = DevTools(tab["webSocketDebuggerUrl"])
            dt.call("Page.enable")
            yield dt, url
        finally:
            browser.terminate()
            browser.wait(timeout=15)


def test_chat_page_streams_a_reply(page):
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
    dt, url = page
    dt.open(url + "/?temperature=0&max_tokens=12")
    notice = dt.js("document.getElementById('notice').textContent")
    assert "not on conversations" in notice and "does not follow instructions" in notice  # said once, up top
    dt.ask("Who is Emma?")
    dt.wait("document.body.dataset.state + !!document.getElementById('figures').dataset.tokens", "idletrue",
            what="no reply")
    reply = dt.js("document.querySelector('.msg.assistant').textContent")
    figures = dt.js("document.getElementById('figures').textContent")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "chat_page.png"
    shot.write_bytes(base64.b64decode(dt.call("Page.captureScreenshot", format="png")["data"]))
    print(f"screenshot: {shot}")
    assert reply == expected
    assert "tokens/s: " in figures and "(12 tokens)" in figures and "hit rate" in figures


def test_stop_frees_the_server_at_once_and_the_next_question_starts(page):
    dt, url = page
    cancelled = metric(url, "mixtral_lite_requests_cancelled_total")
    dt.open(url + "/?temperature=0&ignore_eos=1")
    assert dt.js("document.getElementById('max-tokens').value") == "512"  # the default: a long answer, not 4096
    dt.js("document.getElementById('max-tokens').value = 3000")  # half a minute of text or more, unless Stop works
    dt.ask("Tell me everything about Bath.")
    dt.wait("document.querySelectorAll('.msg.assistant')[0]?.textContent.length > 40", True,
            what="no streamed text to stop")
    assert dt.js("getComputedStyle(document.getElementById('stop')).display") != "none"
    dt.js("document.getElementById('stop').click()")
    dt.wait("document.body.dataset.state", "idle", timeout=5, what="the page did not stop")
    assert dt.js("document.querySelector('.msg.assistant').classList.contains('stopped')")
    stopped_at = len(dt.js("document.querySelector('.msg.assistant').textContent"))
    deadline = time.monotonic() + 5  # the server noticed the closed stream and dropped the request
    while metric(url, "mixtral_lite_requests_cancelled_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "mixtral_lite_requests_cancelled_total") == cancelled + 1
    assert metric(url, "mixtral_lite_requests_running") == 0 and metric(url, "mixtral_lite_queue_length") == 0
    time.sleep(0.5)
    assert len(dt.js("document.querySelector('.msg.assistant').textContent")) == stopped_at  # nothing more came
    dt.js("document.getElementById('max-tokens').value = 8")
    dt.ask("And Lyme?")  # the next question is answered at once: the slot is free
    took = dt.wait("document.body.dataset.state + (document.getElementById('figures').dataset.tokens || '')",
                   "idle8", timeout=15, what="the next question after Stop")
    print(f"after Stop, the next 8-token answer took {took:.2f} s")
    assert dt.js("document.querySelectorAll('.msg.assistant').length") == 2


def test_new_chat_cancels_the_running_answer(page):
    dt, url = page
    cancelled = metric(url, "mixtral_lite_requests_cancelled_total")
    dt.open(url + "/?temperature=0&ignore_eos=1&max_tokens=3000")
    dt.ask("Describe the ball at Netherfield.")
    dt.wait("(document.querySelector('.msg.assistant')?.textContent.length || 0) > 20", True)
    dt.js("document.getElementById('reset').click()")
    dt.wait("document.body.dataset.state", "idle", timeout=5)
    assert dt.js("document.getElementById('log').children.length") == 0
    deadline = time.monotonic() + 5
    while metric(url, "mixtral_lite_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "mixtral_lite_requests_running") == 0
    assert metric(url, "mixtral_lite_requests_cancelled_total") == cancelled + 1


def test_model_text_is_never_html_and_the_view_yields_to_the_reader(page):
    dt, url = page
    dt.open(url + "/")
    html = dt.js("""(() => { const d = document.createElement('div');
        render(d, "**bold** and `x < y` <img src=x onerror=window.pwned=1> *it*\\n```python\\n<b>no</b>\\n```");
        return d.innerHTML; })()""")
    assert "<img" not in html and "&lt;img" in html and "<b>" not in html and "&lt;b&gt;no&lt;/b&gt;" in html
    assert "<strong>bold</strong>" in html and "<code>x &lt; y</code>" in html and "<em>it</em>" in html
    assert "<pre><code>" in html and "python" not in html  # the fence's language tag is not shown
    assert dt.js("window.pwned === undefined")
    # auto-scroll: at the bottom the view follows new text; scrolled up, it stays where the reader is
    dt.js("for (let i = 0; i < 60; i++) bubble('assistant', 'line ' + i)")
    assert dt.js("atBottom()")
    dt.js("document.getElementById('log').scrollTop = 0")
    dt.wait("follow", False, timeout=5, what="the scroll event")
    dt.js("bubble('assistant', 'more'); keepUp()")
    assert dt.js("document.getElementById('log').scrollTop") == 0
    dt.js("const l = document.getElementById('log'); l.scrollTop = l.scrollHeight")
    dt.wait("follow", True, timeout=5, what="the scroll event")
    dt.js("bubble('assistant', 'and more')")
    assert dt.js("atBottom()")
    # past the trained context (512 tokens for the shipped model, from /stats): one warning per conversation
    assert dt.js("about.trained_context") == 512
    dt.js("warnContext({prompt_tokens: 500, completion_tokens: 20}); warnContext({prompt_tokens: 600, "
          "completion_tokens: 20})")
    warnings = dt.js("[...document.querySelectorAll('.msg.warning')].map(e => e.textContent)")
    assert len(warnings) == 1 and "520 tokens, past the 512" in warnings[0]


def test_no_request_of_the_page_is_a_404(page):
    dt, url = page
    dt.open(url + "/")
    time.sleep(0.5)  # the browser's own /favicon.ico request, if it makes one
    icon = httpx.get(url + "/favicon.ico", timeout=10)
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert httpx.get(url + "/favicon.svg", timeout=10).status_code == 200
    text = httpx.get(url + "/metrics", timeout=10).text
    assert 'status="404"' not in text, [line for line in text.splitlines() if "404" in line]
