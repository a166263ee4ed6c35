"""A fair FIFO queue in front of the one Session, and the worker thread that drives the model.

The worker takes the oldest waiting requests, up to --max-batch of them, and runs them as one
batch (on the shipped model a batch of 4 doubles total tokens/s); requests that arrive meanwhile
wait for the next batch, in arrival order, so none is starved. A request whose client has gone
is skipped while waiting and leaves its batch at the next token while running. A row that fails
(Session.run) ends alone, with its error; the others in its batch go on.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..generation.session import Generation, Session

DONE = None  # what a job's queue receives after the last text


@dataclass
class Job:
    gen: Generation
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # str pieces of text, then DONE

    def send(self, item: str | None) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class QueueFull(Exception):
    pass


class Scheduler:
    def __init__(self, load: Callable[[], Session], max_queue: int, max_batch: int,
                 on_finish: Callable[[list[Generation], float], None] = lambda gens, seconds: None,
                 on_load_error: Callable[[BaseException], None] = lambda e: None):
        self.max_queue, self.max_batch = max_queue, max_batch
        self.session: Session | None = None
        self.running = 0
        self._load, self.on_finish, self._on_load_error = load, on_finish, on_load_error
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="mixtral-lite-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()

    @property
    def ready(self) -> bool:
        return self.session is not None

    @property
    def queue_length(self) -> int:
        """Requests waiting whose client is still there (a cancelled one's place is free at once)."""
        return sum(not j.gen.cancelled.is_set() for j in list(self._waiting))

    def submit(self, job: Job) -> None:
        with self._wake:
            self._drop_cancelled()
            if len(self._waiting) >= self.max_queue:  # cancelled ones were dropped just above
                raise QueueFull
            self._waiting.append(job)
            self._wake.notify()

    def _work(self) -> None:
        try:
            self.session = self._load()
        except BaseException as e:  # noqa: BLE001 - reported to the server, which exits
            self._on_load_error(e)
            return
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as e:  # a bug must not kill the worker: fail the rows still running, keep serving
                traceback.print_exc()
                for job in batch:
                    if not job.gen.done:
                        job.gen.fail(e)
                        job.send(DONE)
                try:
                    self.on_finish([j.gen for j in batch], 0.0)  # /metrics counts them as failed
                except Exception:  # noqa: BLE001
                    traceback.print_exc()

    def _next_batch(self) -> list[Job] | None:
        with self._wake:
            while True:
                self._drop_cancelled()
                if self._stop:
                    return None
                if self._waiting:
                    n = min(self.max_batch, len(self._waiting))
                    return [self._waiting.popleft() for _ in range(n)]
                self._wake.wait()

    def _drop_cancelled(self) -> None:
        """Forget waiting requests whose client has gone (their place frees at once)."""
        if any(j.gen.cancelled.is_set() for j in self._waiting):
            for j in self._waiting:
                if j.gen.cancelled.is_set():
                    j.send(DONE)
            self._waiting = deque(j for j in self._waiting if not j.gen.cancelled.is_set())

    def _run(self, batch: list[Job]) -> None:
        jobs = {id(j.gen): j for j in batch}
        self.running = len(batch)
        t0 = time.perf_counter()
        try:
            for step in self.session.run([j.gen for j in batch]):
                for gen, text in step:
                    job = jobs[id(gen)]
                    if text:
                        job.send(text)
                    if gen.done:
                        job.send(DONE)
                        self.running -= 1
        finally:
            self.running = 0
        self.on_finish([j.gen for j in batch], time.perf_counter() - t0)
