"""The server under hostile input (issue 25): a request can only fail itself; every field is checked at the
boundary and refused by name; a client that leaves frees its place; a failure is never a 200 with empty
content. Servers listen on 127.0.0.1; every request loop is bounded in count and time."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import openai
import pytest
from refs import rewrite_config
from serving import metric, running_server, serving_app

from mixtral_lite.generation.session import Session
from mixtral_lite.runtime.load import open_session
from mixtral_lite.runtime.plan import plan_load
from mixtral_lite.serve.scheduler import Scheduler
from mixtral_lite.serve.server import build_parser, create_app

MODEL = "austen-mixtral"


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("hostile"), "--max-batch", "4", "--max-queue", "8") as url:
        yield url


def chat(url, timeout=60, **body):
    # json.dumps escapes lone surrogates as \\udXXX, as a hostile client's JSON would carry them
    return httpx.post(url + "/v1/chat/completions", content=json.dumps({"messages": user("Hello"), **body}),
                      headers={"Content-Type": "application/json"}, timeout=timeout)


def assert_error(r, status, param, code):
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["code"]) == (status, param, code), r.text
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    assert param is None or err["message"].startswith(param)


BAD = [
    ({"seed": 1 << 64}, "seed", "invalid_value"),
    ({"seed": -(1 << 63) - 1}, "seed", "invalid_value"),
    ({"max_tokens": 5000}, "max_tokens", "context_length_exceeded"),  # -c 4096
    ({"messages": user("caf\ud800")}, "messages.0.content", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages.0.content.0.text",
     "invalid_value"),
    ({"stop": ["ok", "\ud83d"]}, "stop.1", "invalid_value"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"top_logprobs": 3}, "top_logprobs", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"frequency_penalty": -1}, "frequency_penalty", "unsupported_parameter"),
    ({"logit_bias": {"415": 100}}, "logit_bias", "unsupported_parameter"),
]


@pytest.mark.parametrize("extra, param, code", BAD, ids=[p for _, p, _ in BAD])
def test_fields_checked_at_the_boundary(server, extra, param, code):
    assert_error(chat(server, **{"max_tokens": 2, **extra}), 400, param, code)


@pytest.mark.parametrize("extra, param", [({"echo": True}, "echo"), ({"best_of": 2}, "best_of"),
                                          ({"suffix": "x"}, "suffix"), ({"logprobs": 2}, "logprobs"),
                                          ({"prompt": "a\udc80"}, "prompt")])
def test_completion_fields(server, extra, param):
    r = httpx.post(server + "/v1/completions", content=json.dumps({"prompt": "Once", "max_tokens": 2, **extra}),
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_no_op_values_of_unimplemented_fields_are_accepted(server):
    """Clients send OpenAI's defaults explicitly: those ask for nothing and are served."""
    r = chat(server, max_tokens=3, temperature=0, logprobs=False, presence_penalty=0.0, frequency_penalty=0,
             response_format={"type": "text"}, tools=[], logit_bias={}, user="someone")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_max_tokens_up_to_the_context(server):
    r = chat(server, max_tokens=4096)
    assert_error(r, 400, "max_tokens", "context_length_exceeded")
    room = int(r.json()["error"]["message"].split("at most ")[1].split()[0])
    assert room == 4096 - chat(server, max_tokens=1).json()["usage"]["prompt_tokens"]
    assert chat(server, max_tokens=room + 1).status_code == 400


def test_one_bad_request_cannot_touch_the_others(server):
    """Good requests sent alone, then again among bad ones sent at the same moment: the same answers."""
    questions = ["Who is Emma?", "Describe Bath.", "Write to Jane."]
    alone = [chat(server, messages=user(q), max_tokens=12, temperature=0.8, seed=7 + i).json()["choices"][0]
             ["message"]["content"] for i, q in enumerate(questions)]
    bad = [{"seed": 1 << 64}, {"messages": user("\ud800")}, {"logprobs": True}, {"max_tokens": 10**9}]
    results: dict[str, httpx.Response] = {}

    def send(key, body):
        results[key] = chat(server, **body)
    jobs = [(f"good{i}", {"messages": user(q), "max_tokens": 12, "temperature": 0.8, "seed": 7 + i})
            for i, q in enumerate(questions)] + [(f"bad{i}", b) for i, b in enumerate(bad)]
    threads = [threading.Thread(target=send, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[f"good{i}"].json()["choices"][0]["message"]["content"] for i in range(3)] == alone
    assert all(results[f"bad{i}"].status_code == 400 for i in range(len(bad)))


def test_client_that_times_out_frees_its_place(server):
    """A non-streaming request whose client gives up after 1.5 s: generation stops, the place frees at once."""
    cancelled = metric(server, "mixtral_lite_requests_cancelled_total")
    with pytest.raises(httpx.ReadTimeout):  # no max_tokens: the rest of the 4096-token window, minutes of work
        chat(server, timeout=1.5, messages=user("Tell me everything."), temperature=0, ignore_eos=True)
    deadline = time.monotonic() + 10
    while metric(server, "mixtral_lite_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "mixtral_lite_requests_running") == 0
    assert metric(server, "mixtral_lite_requests_cancelled_total") == cancelled + 1
    assert chat(server, max_tokens=2).status_code == 200  # and the next request is served at once


def test_body_size_limit(server):
    t0 = time.monotonic()
    r = httpx.post(server + "/v1/chat/completions", content=b"x" * (10 << 20), timeout=30,
                   headers={"Content-Type": "application/json"})
    assert_error(r, 413, None, "request_too_large")
    assert time.monotonic() - t0 < 10  # refused unread, not tokenized

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(9):
            yield b" " * (1 << 20)
    r = httpx.post(server + "/v1/chat/completions", content=chunks(), timeout=30)
    assert_error(r, 413, None, "request_too_large")
    assert httpx.get(server + "/health", timeout=5).json() == {"status": "ok"}


# ---- in-process: failures injected into the real Session ------------------------------------------------
class Injected(Session):
    """The real Session; seed 666 fails its row at start, seed 999 holds the worker until `gate` opens."""

    gate = threading.Event()

    def _start(self, g):
        if g.params.seed == 999:
            self.gate.wait(30)
        if g.params.seed == 666:
            g.fail("injected failure")
            return False
        return super()._start(g)


@pytest.fixture(scope="module")
def injected(mixtral_ref):
    plan = plan_load(build_parser().parse_args(["-m", str(mixtral_ref[1]), "-t", "1", "-c", "256"]))

    def load():
        s = open_session(plan)
        s.__class__ = Injected
        return s
    scheduler = Scheduler(load, max_queue=8, max_batch=4)
    app = create_app(scheduler, "m")
    scheduler.start()
    with serving_app(app) as url:
        deadline = time.monotonic() + 60
        while not scheduler.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        yield url, scheduler
    scheduler.stop()


def test_a_failed_row_is_an_error_and_its_batch_completes(injected):
    url, scheduler = injected
    body = {"model": "m", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    alone = [chat(url, messages=user(q), **body).json()["choices"][0]["message"]["content"] for q in ("a", "b")]
    failed0 = metric(url, "mixtral_lite_requests_failed_total")
    results = {}

    def send(key, extra):
        try:
            if extra.get("stream"):
                kw = {k: v for k, v in {**body, **extra}.items() if k != "ignore_eos"}
                with openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=60, max_retries=0) as c:
                    list(c.chat.completions.create(messages=user("x"), extra_body={"ignore_eos": True}, **kw))
                results[key] = "no error"
            else:
                results[key] = chat(url, **{**body, **extra})
        except openai.APIError as e:
            results[key] = e
    Injected.gate.clear()
    blocker = threading.Thread(target=send, args=("blocker", {"seed": 999, "max_tokens": 1}))
    blocker.start()
    deadline = time.monotonic() + 30
    while scheduler.running == 0 and time.monotonic() < deadline:  # the worker is held by the blocker
        time.sleep(0.02)
    jobs = [("good0", {"messages": user("a")}), ("bad", {"seed": 666}), ("good1", {"messages": user("b")}),
            ("bad-stream", {"seed": 666, "stream": True})]
    threads = [threading.Thread(target=send, args=j) for j in jobs]
    for t in threads:
        t.start()
    while scheduler.queue_length < 4 and time.monotonic() < deadline:  # all four wait: they form one batch
        time.sleep(0.02)
    assert scheduler.queue_length == 4
    Injected.gate.set()
    for t in [blocker, *threads]:
        t.join(timeout=60)
    assert [results[k].json()["choices"][0]["message"]["content"] for k in ("good0", "good1")] == alone
    assert_error(results["bad"], 500, None, "generation_failed")
    assert "injected failure" in results["bad"].json()["error"]["message"]
    assert isinstance(results["bad-stream"], openai.APIError) and "injected failure" in str(results["bad-stream"])
    assert metric(url, "mixtral_lite_requests_failed_total") == failed0 + 2
    assert metric(url, 'mixtral_lite_requests_total{endpoint="/v1/chat/completions",status="500"}') >= 1


def test_tokenizing_runs_off_the_event_loop(injected, monkeypatch):
    """While one request's prompt is being tokenized (made slow here), the server answers others."""
    url, scheduler = injected
    tok = scheduler.session.tok
    original = type(tok).encode_chat

    def slow(self, messages):
        time.sleep(3)
        return original(self, messages)
    monkeypatch.setattr(type(tok), "encode_chat", slow)
    slow_request = threading.Thread(target=chat, args=(url,), kwargs={"max_tokens": 1})
    slow_request.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert time.monotonic() - t0 < 2  # the loop was free: not behind the 3 s of tokenizing
    slow_request.join(timeout=30)


# ---- the model's own checks, shared with generate ------------------------------------------------------
def test_padded_vocabulary_answers_in_full(mixtral_ref, tmp_path, capsys):
    """A model vocabulary padded past its tokenizer's: the server samples no id without a piece (it stopped
    answers short) and answers what generate answers."""
    import torch
    from safetensors.torch import load_file, save_file

    from mixtral_lite.cli.generate import main as generate_main

    big = tmp_path / "big"
    shutil.copytree(mixtral_ref[1], big)
    t = load_file(big / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t[name] = torch.cat([t[name], torch.full((64, t[name].shape[1]), 5.0)])  # padded rows would win
    save_file(t, big / "model.safetensors", metadata={"format": "pt"})
    rewrite_config(big, vocab_size=32064)
    f = tmp_path / "s.json"
    generate_main(["-m", str(big), "-p", "Once upon a time", "-n", "20", "--temperature", "0", "--ignore-eos",
                   "-t", "1", "--stats-json", str(f)])
    want = capsys.readouterr().out
    with running_server(tmp_path, "-m", str(big), "-c", "256") as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 20,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60).json()
    assert r["usage"]["completion_tokens"] == 20 and r["choices"][0]["finish_reason"] == "length"
    assert r["choices"][0]["text"] + "\n" == want
    assert len(json.loads(f.read_text())["generated_ids"]) == 20
