"""One decoding step with the same shapes and tensors every token, replayed as a CUDA graph.

The eager step (Transformer.forward) reads host values that change per token (the position, how many
KV slots are filled, the chosen experts). The static step keeps all of them on the device:

    position    cache.pos (device), RoPE cos/sin gathered from a table of every position
    KV cache    the new key/value written at slot pos % W; attention over all W slots, masked
    experts     routed on the device through the provider's `run_device` (offload/table.py: an
                address table says where each expert is; nothing is read by the host)

so a token is one graph replay: `DecodeGraph` runs the first step eagerly (it compiles the kernels and
sizes the workspaces), captures the second and replays every later one. The host learns nothing
during a step; it reads the sampled token once per token (generation/decode.py) and lets the experts
provider do its bookkeeping from ids read back asynchronously (`end_step`, `poll`). The eager warm-up
and the replays run the same kernels on the same inputs, so they compute the same logits bit for bit.

Shape legend: B = batch, D = hidden, H = heads, Hkv = kv heads, G = H / Hkv, Dh = head dim, W = window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import RollingKVCache
from .transformer import Transformer, rotate


def static_unsupported(model: Transformer, cache: RollingKVCache) -> str | None:
    """Why this model and cache cannot decode with the static step (None: they can)."""
    if model.embed.weight.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    experts = model.experts
    if model.config.is_moe and not getattr(experts, "device_routing", False):
        return f"experts {type(experts).__name__} need the host's ids every layer (no device routing)"
    if experts is not None and getattr(experts, "max_rows", cache.batch) < cache.batch:
        return f"a batch of {cache.batch} rows is more than the experts' {experts.max_rows}"
    return None


def rope_table(model: Transformer, dtype: torch.dtype) -> torch.Tensor:
    """cos and signed sin of every position [P, 2, Dh] (P = max_position_embeddings), made once."""
    table = getattr(model, "_rope_table", None)
    if table is None or table.dtype != dtype:
        positions = torch.arange(model.config.max_position_embeddings, device=model.embed.weight.device)[None]
        cos, sin = model.rotary.cos_sin(positions, dtype)  # [1, P, 1, Dh] each
        table = torch.stack([cos[0, :, 0], sin[0, :, 0]], dim=1)
        model._rope_table = table
    return table


def _attention(attn, x: torch.Tensor, layer: int, cache: RollingKVCache, rope, slot, mask) -> torch.Tensor:
    # x [B, 1, D] -> [B, 1, D]
    B = x.shape[0]
    h, hkv, dh = attn.h, attn.hkv, attn.dh
    qkv = attn.qkv_proj.forward(x).view(B, 1, h + 2 * hkv, dh)
    qk = rotate(qkv[:, :, : h + hkv], *rope)
    keys, values = cache.attend_static(layer, qk[:, :, h:], qkv[:, :, h + hkv :], slot)  # [B, Hkv, W, Dh]
    # the G query heads of one kv head as G "positions": plain attention, no expanded keys
    q = qk[:, 0, :h].reshape(B, hkv, h // hkv, dh)  # [B, Hkv, G, Dh]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, Hkv, G, Dh]
    return attn.o_proj.forward(out.reshape(B, 1, h * dh))


def _block(block, h: torch.Tensor, cache, rope, slot, mask, experts) -> torch.Tensor:
    h = h + _attention(block.attn, block.input_norm.forward(h), block.index, cache, rope, slot, mask)
    x = block.post_attention_norm.forward(h)
    if block.mlp is not None:
        return h + block.mlp(x)
    B, _, D = x.shape
    weights, ids = block.moe.route(x.view(B, D))
    out = torch.empty_like(h)  # [B, 1, D]
    experts.run_device(block.index, x.view(B, D), ids, weights, h.view(B, D), out.view(B, D))
    return out


def forward_static(model: Transformer, tokens: torch.Tensor, cache: RollingKVCache) -> torch.Tensor:
    """tokens [B, 1] at the device's cache.pos -> logits [B, V]: the static step (see the module docstring)."""
    h = model.embed(tokens)
    slot, mask = cache.begin_static()
    cs = rope_table(model, h.dtype).index_select(0, cache.pos - cache.pad)  # [B, 2, Dh]
    rope = (cs[:, None, None, 0], cs[:, None, None, 1])  # [B, 1, 1, Dh] each
    for block in model.layers:
        h = _block(block, h, cache, rope, slot, mask, model.experts)
    cache.end_static()
    return model.lm_head(model.norm(h))[:, 0]


class DecodeGraph:
    """Decoding steps of one cache as one CUDA graph (see the module docstring)."""

    def __init__(self, model: Transformer, cache: RollingKVCache):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.k.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._key = None
        self.replays = 0

    def _state(self):
        c = self.cache
        return c.k.data_ptr(), c.v.data_ptr(), c.valid.data_ptr(), c.pad.data_ptr(), c.batch

    def usable(self) -> bool:
        """The next step can be static: its position has a RoPE entry (else the eager step runs)."""
        return self.cache.index < self.model.config.max_position_embeddings

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, 1] -> logits [B, V] (a view of the graph's output: read it before the next call)."""
        cache, experts = self.cache, self.model.experts
        if experts is not None:
            experts.poll()
        cache.sync_pos()  # one tiny copy: the host's index is the truth between steps
        self.tokens.copy_(tokens)
        if self._key != self._state():  # first step, or the cache's tensors changed (rows left a batch)
            self.graph, self._key = None, self._state()
            self.logits = forward_static(self.model, self.tokens, cache)  # eager: compiles, warms up
        elif self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = forward_static(self.model, self.tokens, cache)
            self.graph.replay()
        else:
            self.graph.replay()
        self.replays += self.graph is not None
        cache.advance_static()
        if experts is not None:
            experts.end_step(cache.batch)
        return self.logits


def decode_step(model: Transformer, cache: RollingKVCache, tokens: torch.Tensor) -> torch.Tensor:
    """One decoding step, tokens [B, 1] -> logits [B, 1, V]: a CUDA graph replay where the model allows it
    (`model.cuda_graphs`, default on; `static_unsupported` says why not), else the eager step
    (Transformer.decode: forward's values in fewer ops)."""
    graph = getattr(cache, "decode_graph", None)
    if graph is None and getattr(model, "cuda_graphs", True) and static_unsupported(model, cache) is None:
        graph = cache.decode_graph = DecodeGraph(model, cache)
    if graph is not None and graph.usable():
        return graph(tokens)[:, None]
    return model.decode(tokens, cache)
