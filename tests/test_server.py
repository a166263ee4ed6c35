"""`python -m mixtral_lite.server` through the official `openai` client, on the shipped model.

References come from `generate` on the same model and flags in this process (greedy).
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from serving import metric, running_server

from mixtral_lite.cli.generate import main as generate_main
from mixtral_lite.generation.decode import generate
from mixtral_lite.runtime.device import set_threads
from mixtral_lite.runtime.load import open_session
from mixtral_lite.runtime.plan import plan_load
from mixtral_lite.serve.server import build_parser

MODEL = "austen-mixtral"
QUESTIONS = ["Who is Emma?", "Describe the ball at Netherfield.", "Write a letter to Jane.", "What is Bath like?"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server"), "--max-queue", "8") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=60, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def ref():
    """Greedy ids and text of `generate` on the server's model (same defaults: shipped model, K=4)."""
    plan = plan_load(build_parser().parse_args(["-t", "1"]), show_cache_on_cpu=True)  # as the server does
    set_threads(plan.threads)
    session = open_session(plan)
    tok = session.tok

    def run(ids: list[int], n: int) -> tuple[list[int], str]:
        out = generate(session.model, [ids], n, window=session.window, eos_id=tok.eos_id)[0]
        return out, tok.decode(out)
    run.tok = tok
    return run


def chat_ids(ref, messages):
    return ref.tok.encode_chat(messages)


def user(text):
    return [{"role": "user", "content": text}]


def test_chat_equals_generate_with_usage(client, ref):
    ids, text = ref(chat_ids(ref, user(QUESTIONS[0])), 24)
    r = client.chat.completions.create(model=MODEL, messages=user(QUESTIONS[0]), max_tokens=24, temperature=0)
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("stop" if ids[-1] == ref.tok.eos_id else "length")
    assert r.usage.prompt_tokens == len(chat_ids(ref, user(QUESTIONS[0])))
    assert r.usage.completion_tokens == len(ids) and r.usage.total_tokens == r.usage.prompt_tokens + len(ids)


def test_equals_the_generate_command(client, ref, tmp_path, capsys):
    stats = tmp_path / "s.json"
    generate_main(["-p", "Once upon a time", "-n", "16", "--temperature", "0", "--ignore-eos", "-t", "1",
                   "--stats-json", str(stats)])
    out = capsys.readouterr().out
    import json
    expected = json.loads(stats.read_text())["generated_ids"]
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0)
    assert r.choices[0].text + "\n" == out
    assert r.usage.completion_tokens == len(expected) == 16


def test_streaming_chat(client, ref):
    ids, text = ref(chat_ids(ref, user(QUESTIONS[1])), 30)
    chunks = list(client.chat.completions.create(model=MODEL, messages=user(QUESTIONS[1]), max_tokens=30,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_stream_ends_with_done(server):
    body = {"messages": user("Hello"), "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def spanning_stop(ref, ids: list[int]) -> tuple[str, str]:
    """A stop string that starts in one token's text and ends in the next; the text before it."""
    tok = ref.tok
    for i in range(1, len(ids) - 1):
        before, upto = tok.decode(ids[:i]), tok.decode(ids[: i + 1])
        if len(before) >= 2 and len(upto) - len(before) >= 2 and before.strip() and upto[len(before):].strip():
            stop = upto[len(before) - 1 : len(before) + 1]
            cut = tok.decode(ids).find(stop)
            return stop, tok.decode(ids)[:cut]
    raise AssertionError("no token boundary to place a stop string on")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_spanning_tokens(client, ref, stream):
    ids, text = ref(chat_ids(ref, user(QUESTIONS[2])), 40)
    stop, before = spanning_stop(ref, ids)
    kw = {"model": MODEL, "messages": user(QUESTIONS[2]), "max_tokens": 40, "temperature": 0, "stop": [stop]}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        got = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(**kw)
        got, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert got == before and reason == "stop" and stop not in got


def test_four_turns_reuse_the_prefix_and_match_a_full_prefill(client, ref):
    messages, saved = [{"role": "system", "content": "You are a novelist."}], []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        ids, text = ref(chat_ids(ref, messages), 20)  # no reuse: the whole conversation prefilled
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
        assert r.choices[0].message.content == text
        saved.append(r.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": text})
    print(f"prefill tokens saved per turn: {saved}, prompt tokens of the last turn: {r.usage.prompt_tokens}")
    assert saved[0] < 20 and all(s > 0 for s in saved[1:])


def test_four_concurrent_clients_match_alone(server, ref):
    expected = [ref(chat_ids(ref, user(q)), 40)[1] for q in QUESTIONS]
    got, errors = [None] * 4, []

    def one(i):
        try:
            with openai.OpenAI(base_url=server + "/v1", api_key="x", timeout=60, max_retries=0) as c:
                s = c.chat.completions.create(model=MODEL, messages=user(QUESTIONS[i]), max_tokens=40,
                                              temperature=0, stream=True)
                got[i] = "".join(ch.choices[0].delta.content or "" for ch in s)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == expected


def test_disconnect_mid_stream_stops_generation(server):
    cancelled = metric(server, "mixtral_lite_requests_cancelled_total")
    body = {"messages": user("Tell me everything."), "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    # no max_tokens: the rest of the 4096-token window, minutes of work: the slot is free again within
    # seconds only if generation stopped
    deadline = time.monotonic() + 10
    while metric(server, "mixtral_lite_requests_cancelled_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "mixtral_lite_requests_cancelled_total") == cancelled + 1
    assert metric(server, "mixtral_lite_requests_running") == 0


BAD = [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_body"),
    (b'{"model": "austen-mixtral"}', 400, "messages", "invalid_value"),
    (b'{"messages": "hi"}', 400, "messages", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages.0.content", "invalid_value"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "messages.0.role", "invalid_value"),
    (b'{"messages": [{"role": "assistant", "content": "x"}]}', 400, "messages", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}', 400, "max_tokens", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature",
     "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', 400, "top_p", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "n", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": 7}', 400, "stop", "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream", "invalid_value"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}', 404, "model", "model_not_found"),
    (b'{"messages": [{"role": "user", "content": "' + b"word " * 5000 + b'"}]}', 400, "messages",
     "context_length_exceeded"),
]


@pytest.mark.parametrize("body, status, param, code", BAD, ids=[f"{b[:40]!r}" for b, *_ in BAD])
def test_bad_requests(server, body, status, param, code):
    r = httpx.post(server + "/v1/chat/completions", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["code"]) == (status, param, code)
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    assert param is None or err["message"].startswith(param)


def test_bad_completion_prompt(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": ["a", "b"]}, timeout=30)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "prompt")
    assert httpx.get(server + "/health", timeout=5).json() == {"status": "ok"}  # still serving


def test_models_health_metrics(server):
    assert [m["id"] for m in httpx.get(server + "/v1/models", timeout=5).json()["data"]] == [MODEL]
    text = httpx.get(server + "/metrics", timeout=5).text
    for name in ("requests_total", "prompt_tokens_total", "completion_tokens_total", "decode_tokens_per_second",
                 "queue_length", "expert_hit_rate", "prefetch_recall", "bytes_host_to_device_total",
                 "prefill_tokens_saved_total"):
        assert f"mixtral_lite_{name}" in text


def test_queue_full_and_api_key(tmp_path):
    auth = {"Authorization": "Bearer sesame"}
    body = {"messages": user("Tell me everything."), "temperature": 0, "stream": True, "ignore_eos": True}
    with running_server(tmp_path, "--max-queue", "1", "--max-batch", "1", "--api-key", "sesame") as url:
        chat = url + "/v1/chat/completions"
        assert httpx.post(chat, json=body, timeout=10).status_code == 401
        bad = httpx.post(chat, json=body, timeout=10, headers={"Authorization": "Bearer nope"})
        assert (bad.status_code, bad.json()["error"]["code"]) == (401, "invalid_api_key")
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # health needs no key
        with httpx.stream("POST", chat, json=body, timeout=30, headers=auth) as running:
            running_lines = running.iter_lines()  # kept: a dropped iterator closes the response
            next(running_lines)
            with httpx.stream("POST", chat, json=body, timeout=30, headers=auth) as waiting:
                waiting_lines = waiting.iter_lines()
                next(waiting_lines)  # accepted, waiting behind the running one
                deadline = time.monotonic() + 10
                while metric(url, "mixtral_lite_queue_length") < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert metric(url, "mixtral_lite_queue_length") == 1
                with httpx.stream("POST", chat, json=body, timeout=10, headers=auth) as full:
                    assert full.status_code == 503 and full.headers["Retry-After"] == "1"
                    assert full.read() and full.json()["error"]["code"] == "queue_full"
        # both clients left: their places are free at once, and a short request is served
        small = {"messages": user("Hi"), "max_tokens": 2, "temperature": 0}
        r = httpx.post(chat, json=small, timeout=30, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
