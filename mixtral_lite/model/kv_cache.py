"""A fixed-size rolling KV cache: W slots per layer, slot = index mod W.

Keys enter the cache already rotated (RoPE at absolute positions), so a slot never needs
re-rotation when it is reused. Memory is W x layers x kv_heads x head_dim x 2 (x batch x
dtype size) whatever the number of tokens generated: the buffers are allocated once.

Indices and positions. Every row of a batch advances through the same *index*
0, 1, 2, ...; a left-padded row b starts its real tokens at index pad[b], so its RoPE
*position* is index - pad[b] (as transformers computes position_ids from the attention
mask). Attention only depends on index differences, so one shared index per step serves
every row; padding slots are marked invalid per row and never attended to.

Worked example, W = 4, one row, 6 tokens decoded one by one:

    index:        0  1  2  3  4  5
    slot:         0  1  2  3  0  1
    after index 5 the slots hold indices [4, 5, 2, 3]; the query at index 5 attends to
    indices 2..5 (q - k < W), i.e. all four slots.

A prompt chunk of C tokens (chunked prefill, any C) attends over the cache as it was
before the chunk plus the chunk itself, and is written afterwards, so a chunk longer
than W never overwrites keys its own earlier queries still need.
"""

from __future__ import annotations

import torch


def kv_cache_bytes(cfg, window: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of keys and values a RollingKVCache of `window` slots holds for a model config."""
    return 2 * cfg.num_layers * batch * window * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


class RollingKVCache:
    # k, v: [L, B, Hkv, W, Dh]; slot_index: [W] index held by each slot (-1 = empty);
    # valid: [B, W] False where the slot holds a padding token of that row.
    def __init__(self, num_layers: int, batch: int, window: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        if window <= 0:
            raise ValueError(f"KV cache window must be positive, got {window}")
        shape = (num_layers, batch, num_kv_heads, window, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_index = torch.full((window,), -1, device=device, dtype=torch.long)
        self.valid = torch.zeros((batch, window), device=device, dtype=torch.bool)
        self.pad = torch.zeros(batch, device=device, dtype=torch.long)
        self.pos = torch.zeros(1, device=device, dtype=torch.long)  # the static step's token index
        self.window, self.batch = window, batch
        self.index = 0  # index of the next token (host int: no sync to read it)
        self.padded = False  # some row has left padding (set by reset)
        self._marked = 0  # slot_index/valid describe every token before this index

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.slot_index, self.valid, self.pad))

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Start a new sequence (pad[b] = left-padding tokens of row b) without reallocating."""
        self.slot_index.fill_(-1)
        self.valid.zero_()
        self.pad.copy_(pad if pad is not None else torch.zeros_like(self.pad))
        self.padded = pad is not None and bool(pad.any())  # one host read per sequence, not per step
        self.index = 0
        self._marked = 0  # slot_index/valid describe every token before this index

    def truncate(self, num_tokens: int) -> bool:
        """Keep the first num_tokens tokens and forget the rest (prompt reuse); False when impossible.

        Only while no slot was ever reused (index <= W) is slot i still holding index i, so a
        prefix is intact; after the ring wrapped the caller must prefill again. Unpadded only.
        """
        if self.padded or not 0 <= num_tokens <= self.index or self.index > self.window:
            return False
        self._write_unmarked()
        self.slot_index[num_tokens : self.index] = -1
        self.valid[:, num_tokens : self.index] = False
        self.index = self._marked = num_tokens
        return True

    def select_rows(self, rows: list[int]) -> None:
        """Keep only these batch rows (finished requests leave a batch); copies the kept rows once."""
        idx = torch.tensor(rows, device=self.pad.device)
        self._write_unmarked()
        self.k, self.v = self.k.index_select(1, idx), self.v.index_select(1, idx)
        self.valid, self.pad = self.valid.index_select(0, idx), self.pad.index_select(0, idx)
        self.batch = len(rows)

    def positions(self, num_tokens: int) -> torch.Tensor:
        """RoPE positions [B, T] of the next num_tokens tokens (negative for padding)."""
        idx = torch.arange(self.index, self.index + num_tokens, device=self.pad.device)
        return idx.unsqueeze(0) - self.pad.unsqueeze(1)

    def begin(self, num_tokens: int) -> torch.Tensor | None:
        """Prepare a step of num_tokens new tokens; returns the mask [B, 1, T, S] (True = attend).

        The mask is computed once per step and shared by every layer. Decoding without
        padding needs none (every filled slot is within the window): None.
        """
        T, W = num_tokens, self.window
        self._decode = T == 1 and self.index > 0
        if self._decode and not self.padded:  # every filled slot is attended: no mask, no slot bookkeeping
            self._slot, self._n = self.index % W, min(self.index + 1, W)
            return None
        self._write_unmarked()
        if self._decode:  # write first, then attend over the filled slots
            self._slot = slot = self.index % W
            self._n = n = min(self.index + 1, W)
            self.slot_index[slot] = self.index
            self.valid[:, slot] = self.index >= self.pad
            q_idx = self.slot_index.new_full((1,), self.index)
            k_idx, k_valid = self.slot_index[:n], self.valid[:, :n]
        else:  # prefill chunk: the cache as it was + the chunk itself
            self._q_idx = q_idx = torch.arange(self.index, self.index + T, device=self.pad.device)
            self._n = n = min(self.index, W)
            k_idx = torch.cat([self.slot_index[:n], q_idx])
            k_valid = torch.cat([self.valid[:, :n], self._real(q_idx)], dim=1)
        dist = q_idx[:, None] - k_idx[None, :]  # [T, S]
        mask = ((dist >= 0) & (dist < W) & (k_idx[None, :] >= 0))[None] & k_valid[:, None, :]
        mask |= dist[None] == 0  # every query sees itself: padding rows never get an empty softmax
        return mask.unsqueeze(1)

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values; return the keys and values to attend over.

        k, v: [B, T, Hkv, Dh] for the T new tokens (already rotated; views of the projection are
        fine); returns [B, Hkv, S, Dh] x 2.
        """
        n = self._n
        if self._decode:
            self.k[layer, :, :, self._slot].copy_(k[:, 0])
            self.v[layer, :, :, self._slot].copy_(v[:, 0])
            return self.k[layer, :, :, :n], self.v[layer, :, :, :n]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, Dh]
        keys = torch.cat([self.k[layer, :, :, :n], k], dim=2)
        values = torch.cat([self.v[layer, :, :, :n], v], dim=2)
        q_idx = self._kept(self._q_idx)
        keep = len(q_idx)
        slots = q_idx % self.window
        self.k[layer].index_copy_(2, slots, k[:, :, -keep:])
        self.v[layer].index_copy_(2, slots, v[:, :, -keep:])
        return keys, values

    def decode_views(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """After begin(1) of a decoding step: per layer (key slot, value slot [B, Hkv, 1, Dh], keys, values
        [B, Hkv, S, Dh]), views made once for every layer. Writing the new token's key and value into the
        slots, then attending over keys and values, is what attend() does for that layer."""
        if not self._decode:
            raise RuntimeError("decode_views needs a decoding step: begin(1) after the prompt")
        slot, n = self._slot, self._n
        keys, values = (self.k, self.v) if n == self.window else (self.k.narrow(3, 0, n), self.v.narrow(3, 0, n))
        return list(zip(self.k.narrow(3, slot, 1).unbind(0), self.v.narrow(3, slot, 1).unbind(0),
                        keys.unbind(0), values.unbind(0), strict=True))

    def end(self) -> None:
        """Finish the step begun by begin(), after every layer has called attend()."""
        if self._decode:
            self.index += 1
            if self.padded:
                self._marked = self.index
            return
        self._mark(self._q_idx)
        self.index += len(self._q_idx)
        self._marked = self.index

    def _write_unmarked(self) -> None:
        """Record in slot_index/valid the tokens decoded without bookkeeping (unpadded decoding)."""
        if self._marked < self.index:
            self._mark(torch.arange(self._marked, self.index, device=self.pad.device))
            self._marked = self.index

    def _mark(self, q_idx: torch.Tensor) -> None:
        q_idx = self._kept(q_idx)
        slots = q_idx % self.window
        self.slot_index.index_copy_(0, slots, q_idx)
        self.valid.index_copy_(1, slots, self._real(q_idx))

    def _real(self, q_idx: torch.Tensor) -> torch.Tensor:
        return q_idx[None, :] >= self.pad[:, None]  # [B, T]

    def _kept(self, q_idx: torch.Tensor) -> torch.Tensor:
        return q_idx[-self.window :]  # a chunk longer than W keeps only its last W tokens

    # -- the static decoding step (model/static_step.py): same shapes every token, state on the device --
    def begin_static(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Record the next token's slot on the device; returns (slot [1], mask [B, 1, 1, W]: 0 where a slot is
        attended, -inf elsewhere, in the cache's dtype: made once a step for every layer's attention).

        Every step reads and writes the same tensors, so a CUDA graph can replay it: the device's `pos`
        counts the token index (the host syncs it with `sync_pos` before the first static step)."""
        slot = torch.remainder(self.pos, self.window)
        self.slot_index.index_copy_(0, slot, self.pos)
        self.valid.index_copy_(1, slot, (self.pos >= self.pad).unsqueeze(1))
        mask = torch.zeros(self.valid.shape, dtype=self.k.dtype, device=self.k.device)
        return slot, mask.masked_fill_(~self.valid, float("-inf"))[:, None, None, :]

    def attend_static(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor):
        """Store one token's keys/values [B, 1, Hkv, Dh] at `slot`; return the whole window [B, Hkv, W, Dh] x 2
        (the mask from begin_static says which slots to attend)."""
        self.k[layer].index_copy_(2, slot, k.transpose(1, 2))
        self.v[layer].index_copy_(2, slot, v.transpose(1, 2))
        return self.k[layer], self.v[layer]

    def end_static(self) -> None:
        """The device side of a static step's end (inside the graph): the next token's index."""
        self.pos.add_(1)

    def advance_static(self) -> None:
        """The host side of a static step's end (once per replay): slot_index and valid are up to date."""
        self.index += 1
        self._marked = self.index

    def sync_pos(self) -> None:
        """Before static steps: the device's index := the host's, and slot bookkeeping written out."""
        self._write_unmarked()
        self.pos.fill_(self.index)
