"""`python -m mixtral_lite.server`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    GET /health (llama-server's shape)   GET /metrics (Prometheus)   GET /stats (JSON)   GET / (chat page)

The model lives in one worker thread (scheduler.py); handlers only validate, queue and stream.
"""

from __future__ import annotations

import argparse
import asyncio
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

from ..generation.session import Generation, Params, Session
from ..runtime.device import set_threads
from ..runtime.flags import add_model_args
from ..runtime.load import open_session
from ..runtime.plan import plan_load
from .api_schema import ApiError, ChatRequest, CompletionRequest, Sampling, parse
from .metrics import Metrics
from .scheduler import DONE, Job, QueueFull, Scheduler

RETRY_AFTER_S = 1


class Defaults:
    """Sampling defaults for fields a request leaves out (the command line's)."""

    def __init__(self, temperature=0.8, top_k=40, top_p=0.95):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None,
               defaults: Defaults | None = None) -> FastAPI:
    defaults = defaults or Defaults()
    app = FastAPI(title="mixtral-lite", docs_url=None, redoc_url=None)
    metrics = Metrics(lambda: scheduler.queue_length, lambda: scheduler.running, lambda: _expert_stats(scheduler))
    scheduler.on_finish = metrics.finished
    app.add_middleware(CountRequests, counter=metrics.requests)

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
        req = parse(ChatRequest, await request.body())
        ids = _encode(scheduler, req, model_name, "messages", lambda tok: tok.encode_chat(
            [{"role": m.role, "content": m.text()} for m in req.messages]))
        return await _answer(scheduler, req, ids, model_name, defaults, chat=True)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request):
        req = parse(CompletionRequest, await request.body())
        ids = _encode(scheduler, req, model_name, "prompt", lambda tok: tok.encode(req.text()))
        return await _answer(scheduler, req, ids, model_name, defaults, chat=False)
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
    if len(ids) > s.window:
        raise ApiError(400, f"{field}: the prompt is {len(ids)} tokens, more than the {s.window}-token window "
                       "(-c/--ctx-size)", field, "context_length_exceeded")
    return ids


def _params(req: Sampling, ids: list[int], window: int, d: Defaults) -> Params:
    pick = lambda v, default: default if v is None else v  # noqa: E731
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    return Params(max_tokens=req.max_tokens or max(window - len(ids), 1),
                  temperature=float(pick(req.temperature, d.temperature)), top_k=pick(req.top_k, d.top_k),
                  top_p=float(pick(req.top_p, d.top_p)), seed=seed, stop=req.stops(),
                  ignore_eos=req.ignore_eos)


async def _answer(scheduler: Scheduler, req: Sampling, ids: list[int], model_name: str, d: Defaults, chat: bool):
    gen = Generation(ids, _params(req, ids, scheduler.session.window, d))
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
    try:
        pieces = []
        while (item := await job.out.get()) is not DONE:
            pieces.append(item)
    finally:
        gen.cancelled.set()  # no-op when finished; stops generation if this handler was cancelled
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
        yield chunk(delta(None, _reason(job.gen)))
        if include_usage:
            yield chunk([], usage=_usage(job.gen))
        yield "data: [DONE]\n\n"
    finally:
        job.gen.cancelled.set()  # the client left (or we finished): generation stops at the next token


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
    g.add_argument("--port", type=int, default=8080, help="port (0 = any free port; the chosen one is printed)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    g.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 503")
    g.add_argument("--max-batch", type=int, default=4,
                   help="requests decoded together (each row holds its own KV cache of -c tokens)")
    g.add_argument("--model-name", help="the id /v1/models reports (default: the model folder's name)")
    return p


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = build_parser().parse_args(argv)
    if args.max_queue < 1 or args.max_batch < 1:
        raise SystemExit(f"error: --{'max-queue' if args.max_queue < 1 else 'max-batch'} must be >= 1")
    plan = plan_load(args, show_cache_on_cpu=True)  # the shipped model shows its expert cache in /stats
    set_threads(plan.threads)
    name = args.model_name or plan.model_dir.name

    def load() -> Session:  # in the scheduler's worker thread, while the HTTP side answers "loading"
        return open_session(plan)

    def load_failed(e: BaseException) -> None:
        print(f"error: loading {plan.model_dir} failed: {e}", file=sys.stderr)
        os._exit(1)  # the HTTP side must not keep answering "loading" forever

    scheduler = Scheduler(load, args.max_queue, args.max_batch, on_load_error=load_failed)
    app = create_app(scheduler, name, args.api_key)
    sock = socket.create_server((args.host, args.port))  # bound here so --port 0 can print the real port
    port = sock.getsockname()[1]
    print(f"mixtral-lite-server: http://{args.host}:{port}/ (model {name})", file=sys.stderr, flush=True)
    scheduler.start()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()


if __name__ == "__main__":
    main()
