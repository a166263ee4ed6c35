"""The small Mixtral that tools/train_tiny_mixtral.py trains: config, modules, losses, HF export.

Parameter names and shapes are exactly Hugging Face's MixtralForCausalLM layout, so `export`
writes a checkpoint that transformers and mixtral_lite load. Loss = next-token cross-entropy +
router load-balancing loss (Switch / Mixtral, HF's formula).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixtral_lite.model.transformer import RMSNorm, rotate, signed_sin  # the runtime's own: what it trains is what runs


@dataclass
class TinyConfig:
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    num_experts: int = 8
    experts_per_tok: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    router_aux_loss_coef: float = 0.01
    dropout: float = 0.0  # training only (residual branches); not part of the Mixtral architecture

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def rope_tables(cfg: TinyConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin [T, head_dim] in HF's rotate-half convention (what `rotate` takes)."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), signed_sin(emb.sin())


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        h, d, kv = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
        self.h, self.d, self.kv = h, d, kv
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # B = batch, T = tokens, H = heads, K = kv heads, d = head dim
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)  # [B,H,T,d]
        k = self.k_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)  # [B,K,T,d]
        v = self.v_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)  # [B,K,T,d]
        q, k = rotate(q, cos, sin).to(v.dtype), rotate(k, cos, sin).to(v.dtype)
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B,H,T,d]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B,H,T,d]
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.d))


class Expert(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.k = cfg.experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (out [N, D], router logits [N, E]); tokens sorted by expert, one matmul each."""
        # N = tokens, E = experts, A = experts per token
        logits = self.gate(x)  # [N,E]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        w, ids = probs.topk(self.k, dim=-1)  # [N,A]
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        flat = ids.reshape(-1)  # [N*A]
        order = flat.argsort(stable=True)
        tok = order // self.k  # token of each sorted slot
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        xs = x.index_select(0, tok)  # [N*A,D] grouped by expert
        ys = [e(chunk) for e, chunk in zip(self.experts, xs.split(counts), strict=True) if chunk.shape[0] > 0]
        ys = torch.cat(ys) * w.reshape(-1, 1).index_select(0, order)
        out = torch.zeros_like(x).index_add_(0, tok, ys.to(x.dtype))
        return out, logits


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.block_sparse_moe = SparseMoE(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, p: float = 0.0):
        h = h + F.dropout(self.self_attn(self.input_layernorm(h), cos, sin), p, self.training)
        b, t, d = h.shape
        moe, logits = self.block_sparse_moe(self.post_attention_layernorm(h).reshape(b * t, d))
        return h + F.dropout(moe.view(b, t, d), p, self.training), logits


class Backbone(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TinyMixtral(nn.Module):
    """HF MixtralForCausalLM parameter layout: model.* plus lm_head (tied to embed_tokens if asked)."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens [B,T] -> (final normed hidden [B,T,D], router logits per layer [B*T,E])."""
        cos, sin = rope_tables(self.cfg, tokens.shape[1])
        h = F.dropout(self.model.embed_tokens(tokens), self.cfg.dropout, self.training)
        router = []
        for layer in self.model.layers:
            h, logits = layer(h, cos, sin, self.cfg.dropout)
            router.append(logits)
        return self.model.norm(h), router

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens)[0])


def load_balancing_loss(router: list[torch.Tensor], num_experts: int, k: int) -> torch.Tensor:
    """HF/Switch aux loss: E * sum_e (fraction of top-k slots to e) * (mean router prob of e)."""
    logits = torch.cat(router).float()  # [L*N,E]
    probs = logits.softmax(-1)
    mask = F.one_hot(probs.topk(k, dim=-1).indices, num_experts).float()  # [L*N,A,E]
    return num_experts * (mask.mean(0) * probs.mean(0).unsqueeze(0)).sum()


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean CE of (h @ W^T) without materialising [N, V] logits: gradients are formed chunk by chunk
    during the forward pass (softmax - onehot), which halves the memory passes over the 32000-wide
    output that dominate this model's cost. Matmuls run in h's dtype, softmax in fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        # N = tokens, D = hidden, V = vocab
        n = h.shape[0]
        w = weight.to(h.dtype)
        grad_h, grad_w = torch.empty_like(h), torch.zeros(weight.shape, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32)
        for i in range(0, n, chunk):
            hc, tc = h[i : i + chunk], targets[i : i + chunk]
            logp = torch.log_softmax((hc @ w.t()).float(), dim=-1)  # [n,V], one fused kernel
            total -= logp.gather(1, tc[:, None]).sum()
            p = logp.exp_()  # softmax, in place
            p[torch.arange(len(tc)), tc] -= 1.0
            p = p.to(h.dtype)  # d(sum of CE)/d logits; the 1/N is applied to the small products
            grad_h[i : i + chunk] = (p @ w).div_(n)
            grad_w += (p.t() @ hc).float().div_(n)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def loss_fn(model: TinyMixtral, batch: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """batch [B,T+1] -> (mean next-token cross-entropy, router aux loss)."""
    h, router = model.hidden(batch[:, :-1])
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else h.dtype
    h = h.reshape(-1, h.shape[-1]).to(dtype)
    if torch.is_grad_enabled():
        ce = ChunkedCrossEntropy.apply(h, model.lm_head.weight, batch[:, 1:].reshape(-1), chunk)
    else:
        logits = model.lm_head(h).float()
        ce = F.cross_entropy(logits, batch[:, 1:].reshape(-1))
    return ce, load_balancing_loss(router, model.cfg.num_experts, model.cfg.experts_per_tok)


def tokenizer_path() -> Path:
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


def hf_config(cfg: TinyConfig, dtype: str = "bfloat16") -> dict:
    """MixtralConfig-compatible dict (rope_theta both at top level and as rope_parameters)."""
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_norm_eps, "use_cache": True, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": None, "attention_dropout": 0.0,
        "num_experts_per_tok": cfg.experts_per_tok, "num_local_experts": cfg.num_experts,
        "output_router_logits": False, "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "router_jitter_noise": 0.0, "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": dtype, "dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
    }


def export(model: TinyMixtral, out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write HF layout into out: config.json, generation_config.json, tokenizer.model, model.safetensors."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # HF re-ties it from model.embed_tokens.weight
    name = str(dtype).removeprefix("torch.")
    files = {
        "config.json": json.dumps(hf_config(model.cfg, name), indent=2) + "\n",
        "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n",
    }
    for fname, text in files.items():
        (out / (fname + ".tmp")).write_text(text)
        os.replace(out / (fname + ".tmp"), out / fname)
    save_file(state, str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    shutil.copyfile(tokenizer_path(), out / "tokenizer.model.tmp")
    os.replace(out / "tokenizer.model.tmp", out / "tokenizer.model")
