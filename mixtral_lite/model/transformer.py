"""Mixtral / Mistral in plain PyTorch: RMSNorm, RoPE, GQA attention, MoE block, Transformer.

Two ways through the same modules: `forward` (any tokens: prefill chunks, and the reference for
everything) and `decode` (one token per row, what generation runs for every step after the prompt):
the same ops on the same values, bit for bit, with the glue trimmed: activations stay [B, D], the
KV cache's per-layer views are made once a step, no-op casts and reshapes are not dispatched.
benchmarks/bench_cpu_step.py counts the aten ops of both.

Shape legend: B = batch, T = new tokens, S = attended keys, D = hidden, H = heads,
Hkv = kv heads, Dh = head dim, E = experts, A = experts per token, V = vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .compat import require_torch

require_torch()  # before anything below can fail on an old torch with a less helpful error

from offload.kernels import cast  # noqa: E402

from .config import ModelConfig  # noqa: E402
from .experts import ExpertProvider  # noqa: E402
from .kv_cache import RollingKVCache  # noqa: E402


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; equal to the three-step form below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in fp32, scale in the input dtype: what transformers does, bit for bit
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary:
    """RoPE at absolute positions (rotate-half layout, as in the HF checkpoints)."""

    BLOCK = 64  # decoding reads cos/sin from a block of this many positions, recomputed as it moves on

    def __init__(self, head_dim: int, theta: float, device):
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        self.inv_freq = 1.0 / (theta**exps)
        self._block_start, self._block = -1, None

    def at(self, position: int, dtype: torch.dtype):
        """cos, sin [1, 1, 1, Dh] of one position shared by every row (decoding without padding)."""
        start = position - position % self.BLOCK
        if start != self._block_start or self._block[0].dtype != dtype:
            positions = torch.arange(start, start + self.BLOCK, device=self.inv_freq.device)[None]
            self._block, self._block_start = self.cos_sin(positions, dtype), start
        i = position - start
        return self._block[0][:, i : i + 1], self._block[1][:, i : i + 1]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        # positions [B, T] -> cos, signed sin [B, T, 1, Dh] (broadcast over the heads of [B, T, H, Dh])
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]
        return emb.cos().to(dtype), signed_sin(emb.sin()).to(dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., Dh] with its first half negated: what `rotate` takes."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half layout: x * cos + cat(-x2, x1) * sin, written as a roll (bitwise the same)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class Attention(nn.Module):
    """GQA attention; q, k and v are one projection (their weights stacked at load time)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, dh = cfg.hidden_size, cfg.head_dim
        self.h, self.hkv, self.dh = cfg.num_heads, cfg.num_kv_heads, dh
        self.qkv_proj = nn.Linear(d, (self.h + 2 * self.hkv) * dh, bias=False)  # rows: q, then k, then v
        self.o_proj = nn.Linear(self.h * dh, d, bias=False)

    def qkv_rows(self) -> dict[str, slice]:
        """Rows of qkv_proj.weight that hold q_proj, k_proj and v_proj."""
        q, kv = self.h * self.dh, self.hkv * self.dh
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}

    def forward(self, x, layer: int, cache: RollingKVCache, rope, mask):
        B, T, _ = x.shape
        h, hkv = self.h, self.hkv
        qkv = self.qkv_proj.forward(x).view(B, T, h + 2 * hkv, self.dh)  # nn.Linear, or a fused quantized one
        qk = rotate(qkv[:, :, : h + hkv], *rope)  # q and k rotated together: [B, T, H + Hkv, Dh]
        keys, values = cache.attend(layer, qk[:, :, h:], qkv[:, :, h + hkv :])  # [B, Hkv, S, Dh]
        out = F.scaled_dot_product_attention(qk[:, :, :h].transpose(1, 2), keys, values, attn_mask=mask,
                                             enable_gqa=h != hkv)  # [B, H, T, Dh]
        return self.o_proj.forward(out.transpose(1, 2).reshape(B, T, h * self.dh))

    def decode(self, x, kv, rope, mask):
        """forward for one token per row: x [B, D] -> [B, D]; kv: this layer's views from the cache's
        `decode_views` (slots for the new key and value, the keys and values to attend over)."""
        B = x.shape[0]
        h, hkv = self.h, self.hkv
        qkv = self.qkv_proj.forward(x).view(B, h + 2 * hkv, 1, self.dh)  # heads first: one position each
        qk, v = qkv.split((h + hkv, hkv), dim=1)
        q, k = rotate(qk, *rope).split((h, hkv), dim=1)  # [B, H, 1, Dh], [B, Hkv, 1, Dh]
        k_slot, v_slot, keys, values = kv
        k_slot.copy_(k)
        v_slot.copy_(v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=h != hkv)  # [B, H, 1, Dh]
        return self.o_proj.forward(out.view(B, h * self.dh))


class MLP(nn.Module):
    """Mistral's dense SwiGLU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Router + top-k; the experts themselves live behind an ExpertProvider."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.top_k = cfg.experts_per_tok
        self.replay = None  # set only by benchmarks/routing_replay.py: rows -> a recorded run's (weights, ids)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [N, D] -> weights [N, A] fp32, ids [N, A]; softmax and renormalisation in fp32
        probs = F.softmax(cast(F.linear(x, self.router.weight), torch.float32), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.replay is not None:  # benchmarks only; the router's cost stays in the step
            return self.replay(x.shape[0])
        return weights / weights.sum(dim=-1, keepdim=True), ids


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = MoE(cfg) if cfg.is_moe else None
        self.mlp = None if cfg.is_moe else MLP(cfg)

    def forward(self, h, cache, rope, mask, experts: ExpertProvider | None, next_block: Block | None):
        # .forward(): nn.Module.__call__ costs ~2 us a call here, and decoding makes ~30 of them a
        # token (no hooks are ever registered on these modules)
        h = h + self.attn.forward(self.input_norm.forward(h), self.index, cache, rope, mask)
        x = self.post_attention_norm.forward(h)
        if self.mlp is not None:
            return h + self.mlp(x)
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, ids = self.moe.route(flat)
        guess = self.guess_next(h.reshape(B * T, D), experts, next_block)
        return h + experts.run(self.index, flat, ids, weights, guess).view(B, T, D)

    def guess_next(self, h, experts: ExpertProvider, next_block: Block | None) -> torch.Tensor | None:
        """The next layer's router on this layer's residual h [N, D]: ids [N, A] to prefetch by (None: no
        next layer, or the experts provider does not prefetch)."""
        if next_block is None or not experts.wants_guess:
            return None
        logits = next_block.moe.router.forward(next_block.post_attention_norm.forward(h))
        return torch.topk(logits, self.moe.top_k, dim=-1).indices

    def decode(self, h, kv, rope, mask, experts: ExpertProvider | None, next_block: Block | None):
        """forward for one token per row, h [B, D] (see Transformer.decode)."""
        h = h + self.attn.decode(self.input_norm.forward(h), kv, rope, mask)
        x = self.post_attention_norm.forward(h)
        if self.mlp is not None:
            return h + self.mlp.forward(x)
        weights, ids = self.moe.route(x)
        return h + experts.run(self.index, x, ids, weights, self.guess_next(h, experts, next_block))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.experts: ExpertProvider | None = None
        self.rotary: Rotary | None = None

    def new_cache(self, batch: int, window: int) -> RollingKVCache:
        p = self.embed.weight
        c = self.config
        return RollingKVCache(c.num_layers, batch, window, c.num_kv_heads, c.head_dim, p.device, p.dtype)

    def forward(self, tokens: torch.Tensor, cache: RollingKVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only).

        Without a cache: plain causal attention over `tokens` (sliding window respected).
        """
        B, T = tokens.shape
        tokens = tokens.to(self.embed.weight.device, non_blocking=True)  # host ids are accepted too
        if cache is None:
            cache = self.new_cache(B, self.config.sliding_window or T)
        if self.rotary is None:
            self.rotary = Rotary(self.config.head_dim, self.config.rope_theta, tokens.device)
        h = self.embed(tokens)
        if T == 1 and not cache.padded:  # decoding: every row at the same position
            rope = self.rotary.at(cache.index, h.dtype)
        else:
            rope = self.rotary.cos_sin(cache.positions(T), h.dtype)
        mask = cache.begin(T)
        blocks = list(self.layers)
        for block, nxt in zip(blocks, blocks[1:] + [None], strict=True):
            h = block.forward(h, cache, rope, mask, self.experts, nxt)
        cache.end()
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.norm(h))

    def decode(self, tokens: torch.Tensor, cache: RollingKVCache) -> torch.Tensor:
        """One decoding step, tokens [B, 1] -> logits [B, 1, V]: bitwise what forward(tokens, cache) computes,
        in fewer ops (see the module docstring). A cache with nothing in it yet takes forward (a prompt)."""
        if tokens.shape[1] != 1 or cache.index == 0 or self.rotary is None:
            return self.forward(tokens, cache)
        if tokens.device != cache.k.device:  # host ids are accepted too
            tokens = tokens.to(cache.k.device, non_blocking=True)
        h = self.embed(tokens[:, 0])  # [B, D]
        if cache.padded:  # rows at different positions: cos, sin [B, 1, 1, Dh]
            rope = self.rotary.cos_sin(cache.positions(1), h.dtype)
        else:  # [1, 1, 1, Dh]
            rope = self.rotary.at(cache.index, h.dtype)
        mask = cache.begin(1)
        blocks = list(self.layers)
        for block, nxt, kv in zip(blocks, blocks[1:] + [None], cache.decode_views(), strict=True):
            h = block.decode(h, kv, rope, mask, self.experts, nxt)
        cache.end()
        return self.lm_head(self.norm(h))[:, None]  # called as forward calls them: their hooks run
