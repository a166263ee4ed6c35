"""One model in memory serving requests: the generation loop behind the server and the chat REPL.

A `Generation` is one request (prompt ids, sampling settings, stop strings, a cancel flag) and
collects its tokens and text. `Session.run(gens)` runs one or more of them as a left-padded batch
(padding is masked, so each row gets what it would get alone) and yields, once per token step,
the text each row made final. Rows leave the batch as they finish.

Prompt reuse (llama-server's prompt cache): a batch of one runs in the session's own KV cache,
which remembers the ids it holds. A follow-up turn that starts with those ids truncates the cache
back to the common prefix and prefills only the rest, while the prefix is still intact in the
rolling window (the ring never wrapped); otherwise it prefills from scratch.

A row can only fail itself: a row whose start, logits (NaN/Inf) or text fails ends with finish_reason
"error" and its `error` message, and the other rows go on; a failed forward pass fails the rows it
carried (and forgets the cached conversation). Ids past the tokenizer's pieces (a padded vocabulary)
are never sampled, as in generate.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model.static_step import decode_step
from ..model.tokenizer import StreamingDetokenizer, Tokenizer
from ..model.transformer import Transformer
from .decode import check_logits
from .sampling import sample
from .stops import StopStrings


@dataclass
class Params:
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Generation:
    """One request: filled in by Session.run; `cancelled` may be set from any thread."""

    ids: list[int]
    params: Params
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled", "error"
    error: str | None = None  # why the row failed (finish_reason "error")
    cached_tokens: int = 0  # prompt tokens whose KV came from the previous request (not prefilled)
    t_start: float = 0.0
    t_first: float | None = None
    t_end: float | None = None

    def start(self, tok: Tokenizer, device: torch.device) -> None:
        self.rng = torch.Generator(device=device).manual_seed(self.params.seed)
        self._detok, self._stops = StreamingDetokenizer(tok), StopStrings(self.params.stop)
        self._eos = None if self.params.ignore_eos else tok.eos_id
        self.t_start = time.perf_counter()

    def accept(self, token: int) -> str:
        """Add one sampled token; return the text that became final. Sets finish_reason at the end."""
        self.tokens.append(token)
        self.t_first = self.t_first or time.perf_counter()
        if token == self._eos:
            return self._finish("stop")
        text = self._stops.push(self._detok.push(token))
        if self._stops.stopped:
            self.finish_reason, self.t_end = "stop", time.perf_counter()
            return text
        if len(self.tokens) >= self.params.max_tokens:
            return text + self._finish("length")
        return text

    def fail(self, e: BaseException | str) -> str:
        """End this row with finish_reason "error" and a one-line message; returns no text."""
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        self.error = text if isinstance(e, str) else f"{type(e).__name__}: {text}"
        self.finish_reason, self.t_end = "error", time.perf_counter()
        return ""

    def cancel_if_asked(self) -> str:
        return self._finish("cancelled") if self.cancelled.is_set() and self.finish_reason is None else ""

    def _finish(self, reason: str) -> str:
        self.finish_reason, self.t_end = reason, time.perf_counter()
        return self._stops.push(self._detok.flush()) + self._stops.flush()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        dt = (self.t_end or time.perf_counter()) - (self.t_first or 0.0)
        return n / dt if n > 0 and self.t_first and dt > 0 else 0.0


class Session:
    """Owns the model, its batch-1 KV cache and the ids that cache holds."""

    def __init__(self, model: Transformer, tok: Tokenizer, window: int, chunk: int = 512):
        self.model, self.tok, self.window, self.chunk = model, tok, window, chunk
        self.device = model.embed.weight.device
        # a vocabulary padded past the tokenizer's pieces: those ids are never sampled (generate's vocab_limit)
        self.vocab_limit = tok.vocab_size if tok.vocab_size < model.config.vocab_size else None
        self._cache = model.new_cache(1, window)
        self._cached: list[int] = []  # ids whose keys/values sit in self._cache, in order
        self.prefill_saved = 0  # prompt tokens not prefilled thanks to reuse, over the session
        self.lock = threading.Lock()  # one caller at a time drives the model

    def reset(self) -> None:
        """Forget the cached conversation (the next prompt is prefilled in full)."""
        self._cached = []

    @torch.inference_mode()
    def run(self, gens: list[Generation]) -> Iterator[list[tuple[Generation, str]]]:
        """Generate for every row; yield [(generation, new text)] per step until all are done."""
        failed = [g for g in gens if not self._start(g)]
        if failed:
            yield [(g, "") for g in failed]
        live = [g for g in gens if not g.done]
        if not live:
            return
        with self.lock:
            try:
                cache, logits = self._prefill(live)
            except Exception as e:  # noqa: BLE001 - the rows it carried fail; the session stays usable
                yield self._fail_all(live, e)
                return
            step_no = 0
            while live:
                step, nxt = [], []
                for row, g in enumerate(live):  # each row samples alone: its own settings and seed
                    token, text = self._sample(g, logits[row : row + 1, -1], step_no)
                    step.append((g, text))
                    nxt.append(token)
                yield step
                keep = [row for row, g in enumerate(live) if not (g.done or g.cancel_if_asked())]
                if not keep:
                    break
                if len(keep) < len(live):
                    cache.select_rows(keep)
                live, nxt = [live[r] for r in keep], [nxt[r] for r in keep]
                step_no += 1
                try:
                    logits = self._feed(cache, torch.stack(nxt), live)
                except Exception as e:  # noqa: BLE001
                    yield self._fail_all(live, e)
                    return

    def _start(self, g: Generation) -> bool:
        try:
            g.start(self.tok, self.device)
        except Exception as e:  # noqa: BLE001 - e.g. a seed torch cannot take: this row alone fails
            g.fail(e)
            return False
        return True

    def _sample(self, g: Generation, last: torch.Tensor, step_no: int) -> tuple[torch.Tensor, str]:
        """(token [1], text) for one row from its logits [1, V]; a failure fails the row alone."""
        p = g.params
        last = last.float()
        try:
            limited = last
            if self.vocab_limit is not None:
                limited = last.clone()
                limited[:, self.vocab_limit :] = -math.inf
            token = sample(limited, p.temperature, p.top_k, p.top_p, g.rng)
            tid = int(torch.where(torch.isfinite(last).all(dim=-1), token, -1))  # the row's one host sync
            if tid < 0:
                check_logits(last, "prompt evaluation" if step_no == 0 else f"decode step {step_no}")
            return token, g.accept(tid) + g.cancel_if_asked()
        except Exception as e:  # noqa: BLE001
            return torch.zeros(1, dtype=torch.long, device=self.device), g.fail(e)

    def _fail_all(self, live: list[Generation], e: Exception) -> list[tuple[Generation, str]]:
        self.reset()  # the cache may hold part of a step
        return [(g, g.fail(e)) for g in live if not g.done]

    def _prefill(self, gens: list[Generation]):
        """(cache, last logits [B, 1, V]) after the prompts; reuses the cached prefix for one row."""
        if len(gens) == 1:
            g = gens[0]
            reuse = self._reusable(g.ids)
            g.cached_tokens = reuse
            self.prefill_saved += reuse
            self._cached = list(g.ids)
            return self._cache, self._forward_chunks(self._cache, torch.tensor([g.ids[reuse:]], device=self.device))
        longest = max(len(g.ids) for g in gens)
        pad = torch.tensor([longest - len(g.ids) for g in gens], device=self.device)
        tokens = torch.tensor([[0] * (longest - len(g.ids)) + g.ids for g in gens], device=self.device)
        cache = self.model.new_cache(len(gens), self.window)
        cache.reset(pad)
        return cache, self._forward_chunks(cache, tokens)

    def _reusable(self, ids: list[int]) -> int:
        """Tokens of ids to take from the cache (the cache is truncated to them); 0 = start afresh."""
        common = 0
        for a, b in zip(self._cached, ids, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # the last prompt token must run to give the next logits
        if common > 0 and self._cache.truncate(common):
            return common
        self._cache.reset()
        return 0

    def _forward_chunks(self, cache, tokens: torch.Tensor) -> torch.Tensor:
        # tokens [B, T]; chunked prefill as generate_stream does it, so results match token for token
        for start in range(0, tokens.shape[1], self.chunk):
            logits = self.model(tokens[:, start : start + self.chunk], cache, last_only=True)
        return logits

    def _feed(self, cache, nxt: torch.Tensor, live: list[Generation]) -> torch.Tensor:
        # nxt [B, 1]: the sampled tokens go back in; the batch-1 cache remembers them for reuse
        if cache is self._cache:
            self._cached.append(int(nxt[0, 0]))
        return decode_step(self.model, cache, nxt)
