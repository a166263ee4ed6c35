"""The seam between the MoE block and wherever its experts live.

The MoE block computes the router, picks top-k experts and their weights, and hands
them to an `ExpertProvider`. `ResidentExperts` keeps every expert on the device; the
offload engine (through mixtral_lite/runtime/offloading.py) implements the same interface
with a device cache fed from host memory. The model never knows which one it has.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from offload.codec import PlainCodec, for_layer
from offload.engine import expert_input, group_by_expert, index_tensors
from offload.hostsync import to_host
from offload.kernels import ACT, Int4Mat, cast
from offload.packing import views


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """One Mixtral expert: (SiLU(x w1^T) * (x w3^T)) w2^T."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def swiglu_w13(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The same expert with w1 and w3 stacked into w13 [2I, D] (w1 rows, then w3 rows).

    One row (a decoding token) runs one product for both; more rows run two, on views of w13. Resident
    and offloaded experts both call this, so on any device they run the same products, bit for bit.
    """
    i = w2.shape[-1]
    if x.shape[0] == 1:
        gate, up = F.linear(x, w13).split(i, dim=-1)  # w1 x, w3 x
        return F.linear(F.silu(gate) * up, w2)
    return swiglu_expert(x, w13[:i], w2, w13[i:])


def swiglu_fused(x: torch.Tensor, w13: Int4Mat, w2: Int4Mat) -> torch.Tensor:
    """The same expert on the fused int4 kernel, w1 and w3 stacked into one [2I, D] matrix.

    The kernel takes bf16 activations (`act`): x is cast on the way in and the result on the way out, to x's
    dtype; a caller running several experts on one x casts it once and passes it in bf16.
    """
    gate, up = w13(cast(x, ACT)).chunk(2, dim=-1)
    return cast(w2(F.silu(gate) * up), x.dtype)


swiglu_fused.act = ACT  # what its kernels take: run_grouped casts a decoding token's x to it once, for every expert


def expert_function(codec):
    """The expert math that fits what `codec.decode` returns: int4 matrices, a plain stacked w13, or w1, w2, w3."""
    if tuple(codec.names) != ("w13", "w2"):
        return swiglu_expert
    return swiglu_w13 if isinstance(codec, PlainCodec) else swiglu_fused


class ExpertProvider(Protocol):
    """Runs the chosen experts of one layer and sums their outputs."""

    def run(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
        next_guess: torch.Tensor | None,
    ) -> torch.Tensor:
        """Sum over a of weights[t, a] * expert_{ids[t, a]}(x[t]).

        x [T, D]; ids [T, A] int64; weights [T, A] fp32 (products are taken in fp32, then cast
        to x.dtype, as transformers does); returns [T, D].
        next_guess [T, A] (or None): the next layer's router applied to this layer's
        input, a guess of what layer + 1 will choose, for speculative prefetch. The
        provider reads ids and next_guess to the host together: one sync per layer.
        """
        ...

    @property
    def wants_guess(self) -> bool:
        """True when the model should compute next_guess (costs one router matmul)."""
        ...

    def stats(self) -> dict:
        """Counters for the run report; at least device_expert_bytes."""
        ...


def run_grouped(x: torch.Tensor, ids_host: list[list[int]], weights: torch.Tensor, get_expert,
                fn=swiglu_expert) -> torch.Tensor:
    """Group tokens by expert and accumulate fn(x, *get_expert(e)) (default: get_expert(e) -> (w1, w2, w3)).

    ids_host is ids as nested Python lists (already on the host), so this adds no sync.
    """
    out = torch.zeros_like(x)
    if len(ids_host) == 1:  # decode: one token, no gather/scatter
        xa = expert_input(x, fn)
        for w, e in zip(weights.split(1, dim=1), ids_host[0], strict=True):  # w [1, 1]: the choice's weight
            out += cast(w * fn(xa, *get_expert(e)), x.dtype)
        return out
    groups = group_by_expert(ids_host)
    index = index_tensors(groups, x.device)  # one pinned async copy for every expert: no host sync
    for e in groups:
        tok_idx, choice_idx = index[e]
        w = weights[tok_idx, choice_idx].unsqueeze(1)
        out.index_add_(0, tok_idx, (w * fn(x[tok_idx], *get_expert(e))).to(x.dtype))
    return out


class FusedResidentExperts:
    """Every quantized expert resident in the fused kernel's layout, converted once at load.

    What the offload engine's slots hold when every expert is cached, without the cache's
    bookkeeping: the same products in the same order, so its output is bitwise the engine's.
    Experts stored in the kernel's own layout (--prepack) are not copied on the CPU: the kernel
    reads the mapped file (the page cache holds what fits, the disk serves the rest).
    """

    wants_guess = False

    def __init__(self, store, codec, device: torch.device | str):
        self.codec = codec
        self.buffers: list[torch.Tensor] = []
        self.mats: list[list[tuple]] = []
        device = torch.device(device)
        in_place = device.type == "cpu" and codec.slot_layout == codec.layout
        for layer in range(store.num_layers):
            row = []
            for e in range(store.num_experts):
                if in_place and (whole := _whole(store.pieces(layer, e), codec.layout.nbytes)) is not None:
                    self.buffers.append(whole)  # mapped pages: never released, the kernel reads them
                    row.append(codec.decode(views(whole, codec.layout)))
                    continue
                buf = torch.empty(codec.slot_layout.nbytes, dtype=torch.uint8, device=device)
                slot = views(buf, codec.slot_layout)
                if in_place:  # stored in pieces: one copy
                    for p in store.pieces(layer, e):
                        buf[p.offset : p.offset + p.src.numel()].copy_(p.src)
                elif device.type == "cpu":
                    for_layer(codec, layer).fill(store.pieces(layer, e), slot)
                else:  # the packed bytes cross once, each piece at its place in the layout, then convert there
                    packed = torch.zeros(codec.layout.nbytes, dtype=torch.uint8)
                    for p in store.pieces(layer, e):
                        packed[p.offset : p.offset + p.src.numel()].copy_(p.src)
                    for_layer(codec, layer).convert(views(packed.to(device), codec.layout), slot)
                store.release(layer, e)
                self.buffers.append(buf)
                row.append(codec.decode(slot))
            self.mats.append(row)

    def stats(self) -> dict:
        return {"device_expert_bytes": sum(b.numel() for b in self.buffers), "expert_bytes": self.codec.layout.nbytes}

    def run(self, layer, x, ids, weights, next_guess=None):
        ids_host = to_host(ids)  # the layer's single host sync
        return run_grouped(x, ids_host, weights, self.mats[layer].__getitem__, swiglu_fused)


def _whole(pieces, nbytes: int) -> torch.Tensor | None:
    """The expert's bytes as one tensor when the store hands them over in one piece (else None)."""
    if len(pieces) == 1 and pieces[0].offset == 0 and pieces[0].src.numel() >= nbytes:
        return pieces[0].src[:nbytes]
    return None


class ResidentExperts:
    """Every expert of every layer on the device: w13 [L][E, 2I, D] (w1 rows, then w3 rows), w2 [L][E, D, I].

    w1 and w3 share one matrix so that a decoding token runs each expert's up-projections as
    one matrix-vector product.
    """

    wants_guess = False

    def __init__(self, w13: list[torch.Tensor], w2: list[torch.Tensor]):
        self.w13, self.w2 = w13, w2
        self.inter = w2[0].shape[-1] if w2 else 0
        # each expert's (w13, w2) views, made once: a step indexes no tensor to find its experts
        self.mats = [list(zip(a.unbind(0), b.unbind(0), strict=True)) for a, b in zip(w13, w2, strict=True)]

    def stats(self) -> dict:
        return {"device_expert_bytes": sum(t.numel() * t.element_size() for t in (*self.w13, *self.w2))}

    def run(self, layer, x, ids, weights, next_guess=None):
        ids_host = to_host(ids)  # the layer's single host sync
        return run_grouped(x, ids_host, weights, self.mats[layer].__getitem__, swiglu_w13)
