"""Run one layer's chosen experts out of the device cache, loading what is missing.

Ties the parts together: a store (host bytes), an ExpertCache (device slots + policy),
a Transfer (copies), a codec (bytes -> matrices), an expert function (the math; the
model supplies it, e.g. SwiGLU), and a Prefetcher (guesses for the next layer). A slot
holds the stored bytes, or, when the codec says so (plain experts on the CPU), the
matrices already in the compute dtype: `load_expert` then converts while it copies.

One step of layer l, given ids already on the host (the caller's single sync):
  1. group tokens by expert; every needed expert is pinned until it has been computed;
  2. start loads for the misses (as many as slots allow without touching pinned ones);
  3. once every demand load is issued, start the prefetch of the guessed experts for
     layer l+1 (never evicting layer l's pinned experts), so speculation never delays a needed
     copy; a prefetch is issued only within the step's bus budget (offload/prefetch.py: the
     calibrated copy time against the layer's device time), only where the miss policy would
     copy that miss rather than run it on the CPU, and only when the expert it evicts has been
     used no more often than the guessed one;
  4. hand the misses the miss policy sends to the host to the host (offload/host_experts.py: computed
     from the host store, never admitted to the cache; on CUDA on a worker thread, from rows that
     crossed with the ids in the layer's one sync: `stage_rows`, offload/host_crossing.py), queue the
     resident experts on the device, then the copied misses as they arrive, then collect the host results; each computed
     expert is unpinned, freeing its slot for misses still pending (prefill with > K experts);
  5. sum the outputs in the same order as `run_grouped` (so fp results are bitwise equal
     to all-resident experts, whatever order the experts were computed in).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from offload.codec import ExpertCodec, for_layer, slot_layout
from offload.global_cache import make_cache
from offload.host_crossing import HostCrossing
from offload.host_experts import HostExperts
from offload.kernels import cast
from offload.miss_policy import MissPolicy
from offload.packing import views
from offload.prefetch import PrefetchBudget, Prefetcher
from offload.stats import OffloadStats
from offload.store import ExpertStore
from offload.transfer import Transfer, make_transfer


def group_by_expert(ids_host: list[list[int]]) -> dict[int, tuple[list[int], list[int]]]:
    """expert -> (token indices, choice indices), experts in order of first use."""
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for t, row in enumerate(ids_host):
        for a, e in enumerate(row):
            tok, choice = groups.setdefault(e, ([], []))
            tok.append(t)
            choice.append(a)
    return groups


def expert_input(x: torch.Tensor, fn) -> torch.Tensor:
    """A decoding token's x as the experts of its step take it, cast once for all of them: in fn's `act` (the
    dtype its kernels take; see mixtral_lite/model/experts.swiglu_fused) when x is fp32, where results in `act`
    are, as factors of an fp32 product, the very numbers their cast back to fp32 would be; else x itself."""
    act = getattr(fn, "act", None)
    return cast(x, act) if act is not None and x.dtype == torch.float32 else x


def load_expert(transfer, store: ExpertStore, codec: ExpertCodec, converting: bool, layer: int, expert: int,
                slot: torch.Tensor, slot_views: dict[str, torch.Tensor], key: int) -> None:
    """Start filling one slot with (layer, expert): a copy of the stored bytes, or, when the
    slot holds the compute dtype (`converting`), the codec's converting fill. The store releases
    the expert's host pages once they have been read (on CUDA, by the copy thread)."""
    pieces = store.pieces(layer, expert)
    done = lambda: store.release(layer, expert)  # noqa: E731
    if converting:
        transfer.load_converting(pieces, key, store.pinned, for_layer(codec, layer), slot_views, store.layout,
                                 done=done)
    else:
        transfer.load(pieces, slot, key, store.pinned, done=done)


class OffloadEngine:
    """Experts of every layer served from `slots` device slots per layer (pool "layer") or `slots` shared by
    every layer (pool "global", offload/global_cache.py); see the module docstring."""

    def __init__(
        self, store: ExpertStore, codec: ExpertCodec, expert_fn: Callable[..., torch.Tensor],
        slots: int, device: torch.device | str, policy: str = "lru", prefetch: bool = True,
        transfer: Callable[[int, int], Transfer] | None = None,
        miss_policy: MissPolicy | None = None, host: HostExperts | None = None, host_thread: bool | None = None,
        pool: str = "layer", prefetch_budget: PrefetchBudget | None = None,
    ):
        """transfer: (num_slots, nbytes) -> Transfer, instead of make_transfer's choice for `device`.
        miss_policy: how many of a layer's misses to copy (default: all); the others run on `host`
        (default on the CPU device: the engine's own codec and expert function); host_thread: run them on
        a worker thread while this one queues the device's work (default: on CUDA only).
        prefetch_budget: the bus time a prefetch may use per layer step (None: uncapped, e.g. on the CPU)."""
        if codec.layout != store.layout:
            raise ValueError("the codec's layout differs from the store's packed layout")
        self.store, self.codec, self.expert_fn, self.prefetch = store, codec, expert_fn, prefetch
        self.layers, self.num_experts = store.num_layers, store.num_experts
        held = slot_layout(codec)
        self._converting = held != store.layout
        if self._converting and torch.device(device).type != "cpu" and not hasattr(codec, "convert"):
            raise ValueError("this codec converts at load only on the CPU; on a GPU its slots hold the stored bytes")
        self.cache = make_cache(pool, self.layers, self.num_experts, slots, held.nbytes, device, policy)
        make = transfer or (lambda n, nbytes: make_transfer(device, n, nbytes))
        self.transfer = make(self.cache.num_slots, store.layout.nbytes)
        self.transfer.adopt(self.cache.pool)  # the pool outlives no copy still landing in it
        # views of every slot (by slot key), built once: decoding a slot allocates nothing
        self._views = [views(b, held) for b in self.cache.buffers()]
        self.prefetcher = Prefetcher(self.layers)
        self.budget = prefetch_budget
        self._step = (0, 0)  # this layer step's (hits, demand copies): what the prefetch budget is sized from
        self.counters = OffloadStats()
        self.miss_policy = miss_policy or MissPolicy("copy")
        if host is None and self.miss_policy.mode != "copy":
            if torch.device(device).type != "cpu":
                raise ValueError("misses on the host need a HostExperts with a CPU codec on this device")
            host = HostExperts(store, codec, expert_fn)
        self.host = host
        if host_thread is None:
            host_thread = torch.device(device).type == "cuda"
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="host-experts", initializer=torch.set_num_threads,
                                          initargs=(torch.get_num_threads(),)) if host and host_thread else None
        backend = getattr(self.transfer, "cuda", None)  # the CUDA seam (torch.cuda or a test's fake), if any
        self._crossing = HostCrossing(backend, torch.device(device)) if host and backend is not None else None
        self._staged: torch.Tensor | None = None
        self._optional: set[int] = set()  # this step's misses copied for their later value

    def _load(self, layer: int, expert: int, pinned: set[tuple[int, int]]) -> None:
        key, evicted = self.cache.place(layer, expert, pinned)
        value = self.miss_policy.value
        if evicted is not None:
            self.prefetcher.evicted(*evicted)
            value.evicted(*evicted)
        if expert in self._optional:
            value.admitted(layer, expert, evicted)
        load_expert(self.transfer, self.store, self.codec, self._converting, layer, expert,
                    self.cache.buffer(key), self._views[key], key)
        self.counters.loads[(layer, expert)] += 1

    def _issue(self, layer: int, pending: deque[int], pinned: set[tuple[int, int]]) -> None:
        while pending and self.cache.can_place(layer, pinned):
            self._load(layer, pending.popleft(), pinned)

    def _prefetch(self, layer: int, guess_rows: list[list[int]], pinned: set[tuple[int, int]]) -> None:
        """Load guessed experts for `layer` (the next one) within the step's budget; `pinned`: the running
        layer's experts, which no guess may evict."""
        want = self.prefetcher.plan(layer, guess_rows, min(self.cache.slots, self.num_experts))
        resident = [e for e in want if self.cache.slot_of(layer, e) is not None]
        absent = [e for e in want if self.cache.slot_of(layer, e) is None]
        # a guess the miss policy would run on the CPU is not worth the bus (none under cpu)
        absent = absent[: self.miss_policy.would_copy(len(resident), len(absent))]
        n = len(absent) if self.budget is None else min(len(absent), self.budget.experts(*self._step))
        # a guess never evicts another guess of the same step, nor, while guessing has been
        # worse than repetition, what the layer used at its previous step
        keep = pinned | {(layer, e) for e in set(want) | self.prefetcher.protected(layer)}
        for e in absent[:n]:
            if not self.cache.can_place(layer, keep):
                break
            victim = self.cache.victim(layer, keep)
            if not self.prefetcher.worth(self.cache.uses(layer, e), victim and self.cache.uses(*victim)):
                self.prefetcher.refused += 1
                continue
            self._load(layer, e, keep)
            self.prefetcher.loaded(layer, e)

    def _prefetch_when_idle(self, layer: int, guess: list[list[int]] | None, pending: deque[int],
                            pinned: set[tuple[int, int]]):
        """Start the prefetch once no demand load is left to issue; returns the guess still due."""
        if guess is None or pending:
            return guess
        self._prefetch(layer, guess, pinned)
        return None

    def _compute(self, layer: int, expert: int, x: torch.Tensor, tok_idx: torch.Tensor | None) -> torch.Tensor:
        key = self.cache.slot_of(layer, expert)
        self.transfer.wait(key)
        mats = self.codec.decode(self._views[key])
        y = self.expert_fn(x if tok_idx is None else x[tok_idx], *mats)
        self.transfer.release(key)
        return y

    def stage_rows(self, x: torch.Tensor) -> None:
        """Start copying the layer input to the host before the caller's host sync for the ids, so that
        one sync covers both (only beside a GPU, only when this step may run a miss on the host)."""
        self._staged = None
        if self._crossing is not None and self.miss_policy.host_possible(x.shape[0]):
            self._staged = self._crossing.stage(x)

    def _on_host(self, layer: int, experts: list[int], x_host: torch.Tensor, groups: dict, rows: int):
        """The misses computed on the host from the host store: (their results, seconds)."""
        t0 = time.perf_counter()
        ys = [self.host.run(layer, e, x_host if rows == 1 else x_host[torch.tensor(groups[e][0])]) for e in experts]
        return ys, time.perf_counter() - t0

    def _host_results(self, experts: list[int], pending) -> dict[int, torch.Tensor]:
        """expert -> its host result on the device (beside a GPU: one block, one async copy)."""
        ys, seconds = pending.result() if self._worker is not None else pending
        c = self.counters
        c.cpu_runs += len(experts)
        c.cpu_s += seconds
        c.copies_avoided_bytes += len(experts) * self.store.layout.nbytes
        if self._crossing is not None:
            ys = self._crossing.send(ys)
        return dict(zip(experts, ys, strict=True))

    def _split(self, hits: list[int], misses: list[int], rows: int) -> tuple[list[int], list[int]]:
        """(misses to copy, misses to run on the host), by the miss policy."""
        n, optional = self.miss_policy.plan(len(hits), len(misses), rows) if self.host is not None else (len(misses), 0)
        self._optional = set(misses[n - optional : n])
        self._step = (len(hits), n)
        self.counters.misses += len(misses)
        self.counters.copies += n
        return misses[:n], misses[n:]

    def run(
        self, layer: int, x: torch.Tensor, ids_host: list[list[int]], weights: torch.Tensor,
        guess_host: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """Sum over a of weights[t, a] * expert_{ids[t][a]}(x[t]); x [T, D], weights [T, A] -> [T, D]."""
        staged, self._staged = self._staged, None  # this call's rows only (stage_rows)
        groups = group_by_expert(ids_host)
        needed = list(groups)
        fresh = self.prefetcher.fresh(layer) & set(needed)  # in a slot because a prefetch brought it this token
        self.prefetcher.observe(layer, set(needed))
        self.miss_policy.value.used(layer, set(needed))
        hits = [e for e in needed if self.cache.slot_of(layer, e) is not None]
        self.counters.hits += len(hits) - len(fresh)  # a use served with no transfer for it this token
        misses, on_host = self._split(hits, [e for e in needed if self.cache.slot_of(layer, e) is None], x.shape[0])
        if layer == 0:
            self.counters.tokens += x.shape[0]
        for e in needed:
            self.cache.access(layer, e)
        pinned, pending = {(layer, e) for e in needed}, deque(misses)
        # speculative loads queue behind every demand load of this step (one copy stream, FIFO)
        guess = guess_host if self.prefetch and layer + 1 < self.layers else None
        self._issue(layer, pending, pinned)
        guess = self._prefetch_when_idle(layer + 1, guess, pending, pinned)
        index = index_tensors(groups, x.device) if x.shape[0] > 1 else None
        xe = expert_input(x, self.expert_fn) if index is None else x
        host_work = None
        if on_host:  # on the host while the device computes (on the CPU device: in turn, same cores)
            if self._crossing is None:  # the CPU device: x itself
                rows = x
            else:  # not staged by the caller: staged now, waited for at once (a host sync of its own)
                rows = self._crossing.rows(staged if staged is not None else self._crossing.stage(x))
            args = (layer, on_host, rows, groups, x.shape[0])
            host_work = self._worker.submit(self._on_host, *args) if self._worker else self._on_host(*args)
        outputs = {}
        for e in hits + misses:  # resident first, queued on the device while the misses are in flight
            if self.cache.slot_of(layer, e) is None:
                self._issue(layer, pending, pinned)
            outputs[e] = self._compute(layer, e, xe, None if index is None else index[e][0])
            pinned.discard((layer, e))
            self._issue(layer, pending, pinned)
            guess = self._prefetch_when_idle(layer + 1, guess, pending, pinned)
        if host_work is not None:
            outputs |= self._host_results(on_host, host_work)
        self.cache.tick(layer)
        return _accumulate(x, groups, index, outputs, weights)

    def close(self) -> None:
        """Wait for the copies still in flight (prefetches compute never waited on)."""
        self.transfer.close()
        if self._worker is not None:
            self._worker.shutdown()

    def stats(self) -> dict:
        p = self.prefetcher
        return self.counters.report(
            bytes_h2d=self.transfer.bytes_copied, stall_s=self.transfer.stall_seconds(),
            pool_bytes=self.cache.allocated_bytes, expert_bytes=self.store.layout.nbytes,
            prefetch_issued=p.issued, prefetch_used=p.used, prefetch_recall=p.recall(),
            host_copy_s=getattr(self.transfer, "host_copy_s", 0.0),
        ) | {"miss_policy": self.miss_policy.mode, "expert_pool": self.cache.kind,
             "pool_slots": self.cache.num_slots, "prefetch_refused": p.refused}


def index_tensors(groups: dict, device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """expert -> (token indices, choice indices) on the device, from ONE host -> device copy."""
    toks = [t for tok, _ in groups.values() for t in tok]
    flat = torch.tensor(toks + [a for _, choice in groups.values() for a in choice])
    if device.type == "cuda":  # pinned + async: no host sync (the caching host allocator keeps it alive)
        flat = flat.pin_memory().to(device, non_blocking=True)
    out, start, n = {}, 0, len(toks)
    for e, (tok, _) in groups.items():
        end = start + len(tok)
        out[e] = (flat[start:end], flat[n + start : n + end])
        start = end
    return out


def _accumulate(x: torch.Tensor, groups: dict, index: dict | None, outputs: dict, weights: torch.Tensor):
    """Same operations, same order as mixtral_lite.experts.run_grouped: bitwise-equal sums.

    weights may be fp32 with x in bf16: each product is formed in the promoted dtype, then
    cast to x's dtype before it is added.
    """
    out = torch.zeros_like(x)
    if index is None:  # decode, one token: experts in choice order (= first use)
        w = weights.split(1, dim=1)  # [1, 1] each
        for e, (_, choice) in groups.items():
            out += cast(w[choice[0]] * outputs[e], x.dtype)
        return out
    for e, (tok_idx, choice_idx) in index.items():
        out.index_add_(0, tok_idx, cast(weights[tok_idx, choice_idx].unsqueeze(1) * outputs[e], x.dtype))
    return out
