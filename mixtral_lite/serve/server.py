"""`python -m mixtral_lite.server`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    GET /health (llama-server's shape)   GET /metrics (Prometheus)   GET /stats (JSON)   GET / (chat page)

The model lives in one worker thread (scheduler.py); handlers only validate, queue and stream.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import secrets
import socket
import sys
import time
import uuid
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ..generation.session import Generation, Params, Session
from ..runtime.errors import EXIT_ERROR, describe, front_door
from ..runtime.flags import POSITIVE, add_model_args, int_range
from .api_schema import ApiError, ChatRequest, CompletionRequest, Sampling, parse
from .limits import BodyLimit
from .metrics import Metrics
from .scheduler import DONE, Job, QueueFull, Scheduler

RETRY_AFTER_S = 1
MAX_BODY = 4 << 20  # bytes; a request's prompt must fit the KV window anyway (32k tokens: ~0.2 MB of text)


class Defaults:
    """Sampling defaults for fields a request leaves out (the command line's)."""

    def __init__(self, temperature=0.8, top_k=40, top_p=0.95):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None,
               defaults: Defaults | None = None, max_body: int = MAX_BODY) -> FastAPI:
    defaults = defaults or Defaults()
    app = FastAPI(title="mixtral-lite", docs_url=None, redoc_url=None)
    metrics = Metrics(lambda: scheduler.queue_length, lambda: scheduler.running, lambda: _expert_stats(scheduler))
    scheduler.on_finish = metrics.finished
    app.add_middleware(BodyLimit, max_bytes=max_body)
    app.add_middleware(CountRequests, counter=metrics.requests)  # outermost: counts the 413s too

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    def require_key(request: Request) -> None:
        _check_key(request, api_key)
    keyed = [Depends(require_key)]

    @app.get("/health")
    async def health():
        if scheduler.ready:
            return {"status": "ok"}
        return JSONResponse({"status": "loading model"}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats():
        s = scheduler.session
        return {"queue_length": scheduler.queue_length, "running": scheduler.running,
                "prefill_tokens_saved": s.prefill_saved if s else 0, **(_expert_stats(scheduler) or {})}

    @app.get("/")
    async def page():
        return HTMLResponse(resources.files("mixtral_lite").joinpath("static/chat.html").read_text("utf-8"))

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "mixtral-lite"}]}

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(request: Request):
        req = await run_in_threadpool(parse, ChatRequest, await request.body())  # parsing, tokenizing: off the loop
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await run_in_threadpool(_encode, scheduler, req, model_name, "messages",
                                      lambda tok: tok.encode_chat(messages))
        return await _answer(request, scheduler, req, ids, model_name, defaults, chat=True)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        req = await run_in_threadpool(parse, CompletionRequest, await request.body())
        ids = await run_in_threadpool(_encode, scheduler, req, model_name, "prompt",
                                      lambda tok: tok.encode(req.text()))
        return await _answer(request, scheduler, req, ids, model_name, defaults, chat=False)
    return app


class CountRequests:
    """ASGI middleware: count every answered request by endpoint and status (streams included)."""

    PATHS = {"/", "/health", "/metrics", "/stats", "/v1/models", "/v1/chat/completions", "/v1/completions"}

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:  # unknown paths share one label: a scanner must not grow the metrics without bound
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.counter.labels(path, str(status[0])).inc()


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    got = request.headers.get("authorization", "")
    if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", None, "invalid_api_key")


def _expert_stats(scheduler: Scheduler) -> dict | None:
    s = scheduler.session
    return s.model.experts.stats() if s is not None and s.model.experts is not None else None


def _check_model(req: Sampling, model_name: str) -> None:
    if req.model is not None and req.model != model_name:
        raise ApiError(404, f"model: '{req.model}' is not served here (this server has '{model_name}')",
                       "model", "model_not_found")


def _encode(scheduler: Scheduler, req: Sampling, model_name: str, field: str, encode) -> list[int]:
    """Prompt ids, checked against the model name, the chat template and the KV window."""
    s = scheduler.session
    if s is None:
        raise ApiError(503, "the model is still loading", None, "loading", "server_error",
                       {"Retry-After": str(RETRY_AFTER_S)})
    _check_model(req, model_name)
    try:
        ids = encode(s.tok)
    except ValueError as e:
        raise ApiError(400, f"{field}: {e}", field, "invalid_value") from None
    limit = context(s)
    if len(ids) >= limit:
        raise ApiError(400, f"{field}: the prompt is {len(ids)} tokens, it leaves no room in the {limit}-token "
                       f"context ({_context_flag(s)})", field, "context_length_exceeded")
    return ids


def context(s: Session) -> int:
    """Tokens a request may hold, prompt and answer: the KV window (-c) of a model without a sliding window,
    else the trained context."""
    cfg = s.model.config
    return s.window if cfg.sliding_window is None else cfg.max_position_embeddings


def _context_flag(s: Session) -> str:
    return "-c/--ctx-size" if s.model.config.sliding_window is None else "the model's max_position_embeddings"


def _params(req: Sampling, ids: list[int], s: Session, d: Defaults) -> Params:
    pick = lambda v, default: default if v is None else v  # noqa: E731
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    room = context(s) - len(ids)
    if req.max_tokens is not None and req.max_tokens > room:
        raise ApiError(400, f"max_tokens: {req.max_tokens} new tokens and the prompt's {len(ids)} exceed the "
                       f"{context(s)}-token context ({_context_flag(s)}); at most {room} here", "max_tokens",
                       "context_length_exceeded")
    return Params(max_tokens=req.max_tokens or room,
                  temperature=float(pick(req.temperature, d.temperature)), top_k=pick(req.top_k, d.top_k),
                  top_p=float(pick(req.top_p, d.top_p)), seed=seed, stop=req.stops(),
                  ignore_eos=req.ignore_eos)


async def _answer(request: Request, scheduler: Scheduler, req: Sampling, ids: list[int], model_name: str,
                  d: Defaults, chat: bool):
    gen = Generation(ids, _params(req, ids, scheduler.session, d))
    job = Job(gen, asyncio.get_running_loop(), asyncio.Queue())
    try:
        scheduler.submit(job)
    except QueueFull:
        raise ApiError(503, f"the queue is full ({scheduler.max_queue} waiting); retry later", None, "queue_full",
                       "server_error", {"Retry-After": str(RETRY_AFTER_S)}) from None
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
            "model": model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(job, meta, chat, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    gone = asyncio.create_task(_client_gone(request))
    try:
        pieces = []
        while True:
            item = asyncio.ensure_future(job.out.get())
            await asyncio.wait({item, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():  # the client left (or timed out): its generation stops, its place frees
                item.cancel()
                gen.cancelled.set()
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            if item.result() is DONE:
                break
            pieces.append(item.result())
    finally:
        gone.cancel()
        gen.cancelled.set()  # no-op when finished; stops generation if this handler was cancelled
    if gen.error is not None:  # never 200 with empty content: the request's own error, OpenAI-shaped
        raise ApiError(500, f"generation failed: {gen.error}", None, "generation_failed", "server_error")
    text = "".join(pieces)
    body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
    return {**meta, "object": "chat.completion" if chat else "text_completion",
            "choices": [{"index": 0, **body, "finish_reason": _reason(gen)}], "usage": _usage(gen)}


async def _sse(job: Job, meta: dict, chat: bool, include_usage: bool):
    """Server-sent events: chunks, the finish chunk, an optional usage chunk, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, **extra) -> str:
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': choices, **extra})}\n\n"

    def delta(text: str | None, reason=None, role=False) -> list[dict]:
        if not chat:
            return [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]
        d = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
        return [{"index": 0, "delta": d, "finish_reason": reason}]

    try:
        if chat:
            yield chunk(delta("", role=True))
        while (item := await job.out.get()) is not DONE:
            yield chunk(delta(item))
        if job.gen.error is not None:  # the headers said 200 already: the stream ends in OpenAI's error event
            err = {"message": f"generation failed: {job.gen.error}", "type": "server_error", "param": None,
                   "code": "generation_failed"}
            yield f"data: {json.dumps({'error': err})}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk(delta(None, _reason(job.gen)))
        if include_usage:
            yield chunk([], usage=_usage(job.gen))
        yield "data: [DONE]\n\n"
    finally:
        job.gen.cancelled.set()  # the client left (or we finished): generation stops at the next token


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: what remains to receive is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _reason(gen: Generation) -> str:
    return "length" if gen.finish_reason == "length" else "stop"


def _usage(gen: Generation) -> dict:
    n, m = len(gen.ids), len(gen.tokens)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m,
            "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixtral-lite-server", description=__doc__.splitlines()[0])
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    g.add_argument("--port", type=int_range(0, 65535, "between 0 and 65535"), default=8080,
                   help="port (0 = any free port; the chosen one is printed)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    g.add_argument("--max-queue", type=POSITIVE, default=16, help="requests that may wait; more get 503")
    g.add_argument("--max-batch", type=POSITIVE, default=4,
                   help="requests decoded together (each row holds its own KV cache of -c tokens)")
    g.add_argument("--model-name", help="the id /v1/models reports (default: the model folder's name)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with front_door():  # generate's one-line errors, for start-up too: config, checkpoint, flags, address
        _main(args)


def _main(args) -> None:
    import uvicorn

    from ..runtime.checks import check_kv_memory, open_tokenizer
    from ..runtime.device import set_threads
    from ..runtime.load import open_session
    from ..runtime.plan import plan_load
    from ..runtime.sizing import decide

    plan = plan_load(args, show_cache_on_cpu=True)  # the shipped model shows its expert cache in /stats
    decided = decide(plan)  # the planner's flag checks and sizes, before the port opens
    open_tokenizer(plan)  # generate's check: a tokenizer larger than the model's vocabulary is refused
    check_kv_memory(plan, plan.window, rows=args.max_batch + 1, flags="-c/--ctx-size and --max-batch")
    set_threads(plan.threads)
    name = args.model_name or plan.model_dir.name

    def load() -> Session:  # in the scheduler's worker thread, while the HTTP side answers "loading"
        return open_session(plan, decided)

    def load_failed(e: BaseException) -> None:
        print(f"error: loading {plan.model_dir} failed: {describe(e)}", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)  # the HTTP side must not keep answering "loading" forever

    scheduler = Scheduler(load, args.max_queue, args.max_batch, on_load_error=load_failed)
    app = create_app(scheduler, name, args.api_key)
    sock = listen(args.host, args.port)  # bound here so --port 0 can print the real port
    port = sock.getsockname()[1]
    print(f"mixtral-lite-server: http://{args.host}:{port}/ (model {name})", file=sys.stderr, flush=True)
    scheduler.start()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or one line naming --host or --port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        if isinstance(e, socket.gaierror) or (e.errno or 0) < 0:  # create_server re-raises getaddrinfo's errors
            raise SystemExit(f"error: --host {host}: not an address this machine can resolve ({e.strerror})") \
                from None
        if e.errno == errno.EADDRINUSE:
            raise SystemExit(f"error: --port {port}: {host}:{port} is already in use (another server? --port 0 "
                             "picks a free port)") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise SystemExit(f"error: --host {host}: not an address of this machine") from None
        if e.errno == errno.EACCES:
            raise SystemExit(f"error: --port {port}: permission denied (ports below 1024 need privileges)") from None
        raise SystemExit(f"error: --host {host} --port {port}: {e.strerror or e}") from None


if __name__ == "__main__":
    main()
