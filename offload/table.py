"""Experts served through an address table: a decoding step never waits for the host.

    table  int64 [L * E] on the device: where expert (l, e)'s bytes are (int4-rows layout, offload/rows.py):
           its device slot when cached, else its pinned host copy, which the kernels read in place over
           the bus (offload/triton_moe.py). Every expert is always readable: a miss costs its bytes on
           the bus once, inside the kernel, and no copy, sync or slot.

A decoding step (`run_device`) is two kernel launches per layer whatever the routing, so the model can
capture the whole step in a CUDA graph. The chosen ids are logged on the device; `end_step` queues
their copy to pinned memory, and `poll` (called before the next step is queued, never blocking) reads
the ids of finished steps and does the cache's work on the host, one step late:

    1. every finished copy into a slot: table[e] := the slot;
    2. per layer, LRU (or LFU, ...) over the ids used; each miss is admitted to a slot:
       table[victim] := its host copy, then (copy stream, after that table write) host -> slot.
The table changes by one 2 KB upload per poll on the compute stream; the copy stream waits for it
before it overwrites a slot, so no kernel ever reads a slot while its expert changes, and writes the
new entry itself right after the copy. A miss is admitted only when a slot is free or the expert has
been used more often than the one it would evict: on the H200 admitting every miss (one step late,
real Mixtral routing, 2 slots a layer) moved as many bytes in copies as in misses and hit 0.13. Prefill
(`run`, T > 1 rows) computes eagerly from host ids (one sync per layer): resident experts from their
slots, the others copied into a slot (admitted) first.

Counters (`stats`, offload/stats.py): a hit is an expert use served from a slot without a transfer for it in
that step; a miss was read over the bus by the kernel (`read_in_place_bytes`); `expert_copies` are admissions
(`admitted_bytes`), and a prefill's copies of experts it needs now are demand misses (`demand_miss_bytes`).
No prefetch: a guess would cost the bus what a miss read in place costs.

The slots are a per-layer cache or one pool for every layer (offload/global_cache.py); the table keeps
mapping (layer, expert) -> an address either way, so the kernels do not know which.
"""

from __future__ import annotations

import numpy as np
import torch

from offload.codec import for_layer
from offload.engine import group_by_expert, index_tensors
from offload.global_cache import make_cache
from offload.hostsync import to_host
from offload.packing import views
from offload.stats import bus_figures
from offload.streams import backend_for
from offload.triton_moe import TableMoE

QUEUED, COPIED = "queued", "copied"  # an admission's state before / after its copy (CPU: copied at once)


class TableEngine:
    """See the module docstring. `codec` converts the store's bytes into the int4-rows layout."""

    wants_guess = False
    device_routing = True
    RING = 4  # steps whose ids may be on their way to the host at once
    KERNEL_ROWS = 8  # eager steps of up to this many rows run the decoding kernels (weights read once per row)

    def __init__(self, store, codec, slots: int, device: torch.device | str, top_k: int, policy: str = "lru",
                 max_rows: int = 64, moe=None, backend=None, pool: str = "layer"):
        self.store, self.codec, self.top_k = store, codec, top_k
        self.device = torch.device(device)
        self.layers, self.num_experts = L, E = store.num_layers, store.num_experts
        self.layout = codec.slot_layout
        nbytes = self.layout.nbytes
        self.cuda = backend or backend_for(self.device)
        self.cache = make_cache(pool, L, E, slots, nbytes, self.device, policy)
        self._slot_addr = [b.data_ptr() for b in self.cache.buffers()]  # by slot key
        self._scratch = torch.empty(store.layout.nbytes, dtype=torch.uint8, device=self.device)  # packed staging
        every = self.cache.num_slots == L * E
        self.host = None if every else self._host_copies()
        self.mirror = np.zeros(L * E, dtype=np.int64)  # what the table says, as the host last wrote it
        for layer in range(L):
            for e in range(E):
                if every:  # every expert resident: converted straight into its slot, no host copy
                    key, _ = self.cache.place(layer, e, set())
                    self._convert(layer, e, self.cache.buffer(key))
                    self.mirror[layer * E + e] = self._slot_addr[key]
                else:
                    self.mirror[layer * E + e] = self.host[layer][e].data_ptr()
        self.table = torch.tensor(self.mirror, device=self.device)
        off = {en.name: en.offset for en in self.layout.entries}
        self.moe = moe or TableMoE(codec.shapes["w2"][0], codec.shapes["w2"][1], codec.spec.group_size, off, top_k)
        self.max_rows = max_rows
        self.h = torch.empty(max_rows * top_k, codec.shapes["w2"][1], dtype=torch.bfloat16, device=self.device)
        self.ids_log = torch.zeros(L, max_rows, top_k, dtype=torch.long, device=self.device)
        self._views = [views(b, self.layout) for b in self.cache.buffers()]
        self._steps: list[tuple] = []  # queued steps: (rows, ids host buffer, event, which entries were slots)
        self._ids_ring = [self._pinned(L * max_rows * top_k * 8).view(torch.long) for _ in range(self.RING)]
        self._ring_next = 0
        self._rows_staging = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=self.device)
        self._admitting: dict[int, tuple[int, int, object]] = {}  # slot key -> (layer, expert, QUEUED|COPIED|event)
        self._mirror_bufs = [self._pinned(L * E * 8) for _ in range(2)]
        self._mirror_events: list = [None, None]
        self._flip = 0
        self.copy_stream = self.cuda.Stream(self.device) if self.cuda else None
        self.counters = {"tokens": 0, "hits": 0, "misses": 0, "copies": 0, "bytes_copied": 0, "bytes_read_in_place": 0,
                         "bytes_admitted": 0, "bytes_demand": 0}
        self.uses = [np.zeros(E, dtype=np.int64) for _ in range(L)]  # uses per expert: admissions are gated by it

    # -- load -----------------------------------------------------------------------------------
    def _pinned(self, nbytes: int) -> torch.Tensor:
        return self.cuda.pin(nbytes) if self.cuda else torch.empty(nbytes, dtype=torch.uint8)

    def _convert(self, layer: int, e: int, dst: torch.Tensor) -> None:
        """Expert (layer, e) from the store into dst (rows layout, on dst's device), converted once."""
        pieces = self.store.pieces(layer, e)
        for p in pieces:
            self._scratch[p.offset : p.offset + p.src.numel()].copy_(p.src)
        self.store.release(layer, e)
        for_layer(self.codec, layer).convert(views(self._scratch, self.store.layout), views(dst, self.layout))

    def _host_copies(self) -> list[list[torch.Tensor]]:
        """Every expert in the rows layout in pinned host memory (converted on the device, copied back)."""
        nbytes, out = self.layout.nbytes, []
        staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        for layer in range(self.layers):
            block = self._pinned(self.num_experts * nbytes).view(self.num_experts, nbytes)
            for e in range(self.num_experts):
                self._convert(layer, e, staging)
                block[e].copy_(staging)
            out.append(list(block))
        return out

    # -- decoding: two kernels a layer, no host round trip -----------------------------------------
    def run_device(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                   residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = residual + MoE(x) for T <= max_rows rows; ids [T, A] (this layer's), weights [T, A] fp32."""
        t = x.shape[0]
        logged = self.ids_log[layer, :t]
        logged.copy_(ids)  # for end_step; and contiguous [T, A] int64, as the kernels index it
        self.moe(x.contiguous(), logged, weights.float().contiguous(), self.table, layer * self.num_experts,
                 self.h[: t * self.top_k], out, residual)
        return out

    def end_step(self, rows: int) -> None:
        """After a decoding step is queued: its ids go to the host asynchronously (read by `poll`)."""
        if len(self._steps) == self.RING:  # every buffer in flight: wait for the oldest step (rare)
            if self._steps[0][2] is not None:
                self._steps[0][2].synchronize()
            self.poll()
        buf = self._ids_ring[self._ring_next][: self.layers * rows * self.top_k].view(self.layers, rows, self.top_k)
        self._ring_next = (self._ring_next + 1) % self.RING
        buf.copy_(self.ids_log[:, :rows], non_blocking=True)
        ev = None
        if self.cuda:
            ev = self.cuda.Event()
            ev.record(self.cuda.current_stream(self.device))
        in_slot = self.mirror != self._host_mirror_addrs()
        self._steps.append((rows, buf, ev, in_slot))

    def _host_mirror_addrs(self) -> np.ndarray:
        if self.host is None:
            return np.zeros_like(self.mirror)
        if not hasattr(self, "_host_addrs"):
            self._host_addrs = np.array([t.data_ptr() for row in self.host for t in row], dtype=np.int64)
        return self._host_addrs

    def poll(self) -> None:
        """The cache's work for every step whose ids have reached the host (never waits for the device)."""
        changed = self._finish_admissions()
        while self._steps and (self._steps[0][2] is None or self._steps[0][2].query()):
            rows, buf, _, in_slot = self._steps.pop(0)
            changed |= self._account(buf.tolist(), in_slot)
        if changed:
            self._upload()
            self._start_copies()

    def _account(self, ids: list, in_slot: np.ndarray) -> bool:
        c, E, admits = self.counters, self.num_experts, False
        c["tokens"] += len(ids[0])
        for layer, rows in enumerate(ids):
            used = list(group_by_expert(rows))
            for e in used:
                self.cache.access(layer, e)
            for e in (e for row in rows for e in row):
                hit = bool(in_slot[layer * E + e])
                c["hits" if hit else "misses"] += 1
                c["bytes_read_in_place"] += 0 if hit else self.layout.nbytes
            for e in used:
                self.uses[layer][e] += 1
            if self.host is not None:
                in_flight = {(lay, e) for lay, e, _ in self._admitting.values()}
                keep = {(layer, e) for e in used} | in_flight
                for e in used:
                    if self.cache.slot_of(layer, e) is None:
                        admits |= self._admit(layer, e, keep)
            self.cache.tick(layer)
        return admits

    def _admit(self, layer: int, e: int, keep: set[tuple[int, int]]) -> bool:
        """A slot for (layer, e) when one is free, or when e has been used more often than the expert the cache
        policy would evict (a copy costs the bus as much as a miss read in place: admitting every miss made
        the copies as many as the misses, measured). The evicted expert reads from the host from the next
        upload on. Experts still being copied in are never evicted (`keep`)."""
        if not self.cache.can_place(layer, keep):
            return False
        victim = self.cache.victim(layer, keep)  # None: a free slot; in a global pool, maybe another layer's
        if victim is not None and self.uses[layer][e] <= self.uses[victim[0]][victim[1]]:
            return False
        key, evicted = self.cache.place(layer, e, keep)
        keep.add((layer, e))  # in flight from now on
        if evicted is not None:
            self._to_host(*evicted)
        self._admitting[key] = (layer, e, QUEUED)  # a later admission into the slot replaces this one
        return True

    def _to_host(self, layer: int, e: int) -> None:
        self.mirror[layer * self.num_experts + e] = self.host[layer][e].data_ptr()

    def _upload(self) -> None:
        """The host's table -> the device's, in stream order (double-buffered pinned source)."""
        i, self._flip = self._flip, 1 - self._flip
        if self._mirror_events[i] is not None:
            self._mirror_events[i].synchronize()  # two uploads back: long done in practice
        src = self._mirror_bufs[i].view(torch.long)
        src.copy_(torch.from_numpy(self.mirror))
        self.table.copy_(src, non_blocking=True)
        if self.cuda:
            ev = self.cuda.Event()
            ev.record(self.cuda.current_stream(self.device))
            self._mirror_events[i] = ev

    def _start_copies(self) -> None:
        """Admissions whose table no longer points a kernel at their slot's old expert: copy host -> slot, then
        (same stream, right after the copy) point the table at the slot, so kernels read it as soon as it is
        whole rather than from the next poll on; the mirror follows when `poll` sees the copy done."""
        compute = self.cuda.current_stream(self.device) if self.cuda else None
        after = None
        if self.cuda:
            after = self.cuda.Event()
            after.record(compute)
        for key, (layer, e, state) in list(self._admitting.items()):
            if state is not QUEUED:
                continue
            dst, src = self.cache.buffer(key), self.host[layer][e]
            entry = self.table[layer * self.num_experts + e]
            if self.cuda:
                with self.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_event(after)
                    self.cuda.copy(dst, src)
                    entry.fill_(self._slot_addr[key])
                    done = self.cuda.Event()
                    done.record(self.copy_stream)
            else:
                dst.copy_(src)
                entry.fill_(self._slot_addr[key])
                done = COPIED
            self._admitting[key] = (layer, e, done)
            self.counters["copies"] += 1
            self.counters["bytes_copied"] += self.layout.nbytes
            self.counters["bytes_admitted"] += self.layout.nbytes

    def _finish_admissions(self) -> bool:
        changed = False
        for key, (layer, e, state) in list(self._admitting.items()):
            if state is QUEUED:
                continue  # its copy has not been started yet
            if state is COPIED or state.query():
                self.mirror[layer * self.num_experts + e] = self._slot_addr[key]
                del self._admitting[key]
                changed = True
        return changed

    # -- the eager step: the kernels for a few rows, else (prefill) dequantized experts from host ids ----------
    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, next_guess=None):
        """Sum over a of weights[t, a] * expert_{ids[t, a]}(x[t]) (any T). Up to KERNEL_ROWS rows: the
        decoding kernels, no host sync (the ids are logged for `end_step` like a static step's); more
        rows: prefill, one host sync, each expert dequantized once and multiplied with all its rows."""
        if x.shape[0] <= min(self.KERNEL_ROWS, self.max_rows):
            if layer == 0:
                self.poll()
            out = torch.empty_like(x, dtype=torch.bfloat16)
            self.run_device(layer, x.to(torch.bfloat16), ids, weights, None, out)
            if layer == self.layers - 1:
                self.end_step(x.shape[0])
            return out.to(x.dtype)
        ids_host = to_host(ids)
        groups = group_by_expert(ids_host)
        self.poll()
        if self.copy_stream is not None:  # slots being filled by admissions are read below
            self.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        index = index_tensors(groups, x.device) if x.shape[0] > 1 else None
        out = torch.zeros_like(x)
        for e, (_tok, choice) in groups.items():
            self.cache.access(layer, e)
            slot = self._slot_for(layer, e, {(layer, g) for g in groups})
            src = self._views[slot] if slot is not None else self._staged(layer, e)
            w13, w2 = self.codec.decode(src)
            xs = x if index is None else x[index[e][0]]
            gate, up = w13(xs.to(torch.bfloat16)).chunk(2, dim=-1)
            y = w2(torch.nn.functional.silu(gate) * up)
            if index is None:
                out += (weights[:, choice[0] : choice[0] + 1] * y).to(x.dtype)
            else:
                tok_idx, choice_idx = index[e]
                out.index_add_(0, tok_idx, (weights[tok_idx, choice_idx].unsqueeze(1) * y).to(x.dtype))
        self.cache.tick(layer)
        return out

    def _slot_for(self, layer: int, e: int, keep: set[tuple[int, int]]) -> int | None:
        """e's slot key, admitting it now (a copy on the compute stream) when one can be had."""
        key = self.cache.slot_of(layer, e)
        if key is not None or self.host is None or not self.cache.can_place(layer, keep):
            return key
        key, evicted = self.cache.place(layer, e, keep)
        self._admitting.pop(key, None)
        if evicted is not None:
            self._to_host(*evicted)
        self.cache.buffer(key).copy_(self.host[layer][e], non_blocking=True)
        self.mirror[layer * self.num_experts + e] = self._slot_addr[key]
        self._upload()
        self.counters["copies"] += 1
        self.counters["bytes_copied"] += self.layout.nbytes
        self.counters["bytes_demand"] += self.layout.nbytes
        return key

    def _staged(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """A host expert copied into the device staging buffer (prefill, when no slot can be had)."""
        self._rows_staging.copy_(self.host[layer][e], non_blocking=True)
        self.counters["bytes_copied"] += self.layout.nbytes
        self.counters["bytes_demand"] += self.layout.nbytes
        return views(self._rows_staging, self.layout)

    # -- report --------------------------------------------------------------------------------
    def stats(self) -> dict:
        c = self.counters
        moved = c["bytes_copied"] + c["bytes_read_in_place"]
        return {"expert_hits": c["hits"], "expert_misses": c["misses"],
                "expert_copies": c["copies"], "bytes_host_to_device": moved,
                "bytes_read_in_place": c["bytes_read_in_place"], "bytes_copied": c["bytes_copied"],
                "bytes_per_token": moved / c["tokens"] if c["tokens"] else None,
                "device_expert_bytes": self.cache.allocated_bytes, "expert_bytes": self.layout.nbytes,
                "stall_s": 0.0,  # a step never waits for a copy: a miss is read where it is
                "prefetch_issued": 0, "prefetch_used": 0, "prefetch_wasted": 0,
                "prefetch_recall": None, "miss_policy": "read", "expert_pool": self.cache.kind,
                "pool_slots": self.cache.num_slots} | bus_figures(
                    c["tokens"], c["hits"], c["misses"], 0, demand_miss=c["bytes_demand"],
                    read_in_place=c["bytes_read_in_place"], admitted=c["bytes_admitted"])

    def close(self) -> None:
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
