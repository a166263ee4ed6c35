"""Write a Hugging Face Mixtral (or Mistral) checkpoint as a GGUF file that llama.cpp runs.

    python benchmarks/gguf_export.py HF_DIR OUT.gguf [--dtype f32|f16]

The layout is the one llama.cpp's own converter produces for these models: architecture
"llama" with `expert_count` / `expert_used_count`, each layer's experts stacked into one
[E, ...] tensor per matrix (w1 -> ffn_gate_exps, w2 -> ffn_down_exps, w3 -> ffn_up_exps), the
router as ffn_gate_inp, and Q/K rows reordered for llama.cpp's RoPE (see `rope_permute`).
The vocabulary (pieces, scores, types) comes from the folder's SentencePiece tokenizer.model.

Tensors are read one at a time and written as they are read, so peak memory is one tensor
(for experts: one layer's stack of one matrix). The file is written to OUT.gguf.tmp, then
renamed. A benchmark tool: it needs the `gguf` package (pip install gguf).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixtral_lite.model.checkpoint import Checkpoint, expected_shapes, expert_name
from mixtral_lite.model.config import ModelConfig

EXPERT_MATRICES = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}
DENSE_MLP = {"gate_proj": "ffn_gate", "down_proj": "ffn_down", "up_proj": "ffn_up"}
LAYER_TENSORS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output"}
# Kept in fp32 even with --dtype f16 (llama.cpp's converter does the same): norms are 1-D,
# and the router decides which experts run, so rounding it could change the routing.
KEEP_F32 = ("_norm", "ffn_gate_inp")


@dataclass(frozen=True)
class Entry:
    """One GGUF tensor: its name, shape (torch order) and the HF tensor(s) it is made of."""
    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # several = stacked along a new first axis (experts)
    permute_heads: int = 0  # > 0: apply rope_permute with this many heads


def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection from HF's RoPE layout to llama.cpp's.

    HF rotates dimension i of a head with dimension i + d/2 ("rotate half"); llama.cpp's
    llama architecture rotates adjacent pairs (2i, 2i+1). Moving row i to 2i and row i + d/2
    to 2i+1 in every head makes the two compute the same attention scores.
    w: [n_heads * d, D] -> [n_heads * d, D]
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"projection with {rows} rows cannot be split into {n_heads} heads of even size")
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plan(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of the GGUF file, in writing order."""
    d, shapes = cfg.hidden_size, expected_shapes(cfg)

    def single(name: str, source: str, heads: int = 0) -> Entry:
        return Entry(name, shapes[source], (source,), heads)

    out = [Entry("token_embd.weight", (cfg.vocab_size, d), ("model.embed_tokens.weight",))]
    for i in range(cfg.num_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for hf, ours in LAYER_TENSORS.items():
            heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(ours, 0)
            out.append(single(b + ours + ".weight", p + hf + ".weight", heads))
        if cfg.is_moe:
            out.append(single(b + "ffn_gate_inp.weight", p + "block_sparse_moe.gate.weight"))
            for w, ours in EXPERT_MATRICES.items():
                names = tuple(expert_name(i, e, w) for e in range(cfg.num_experts))
                shape = (cfg.num_experts, *shapes[names[0]])
                out.append(Entry(b + ours + ".weight", shape, names))
        else:
            for hf, ours in DENSE_MLP.items():
                out.append(single(b + ours + ".weight", p + "mlp." + hf + ".weight"))
    out.append(Entry("output_norm.weight", (d,), ("model.norm.weight",)))
    if not cfg.tie_word_embeddings:  # tied: llama.cpp reuses token_embd when `output` is absent
        out.append(Entry("output.weight", (cfg.vocab_size, d), ("lm_head.weight",)))
    return out


def storage_dtype(name: str, shape: tuple[int, ...], dtype: str) -> np.dtype:
    if dtype == "f32" or len(shape) == 1 or any(k in name for k in KEEP_F32):
        return np.dtype(np.float32)
    return np.dtype(np.float16)


def read(ckpt: Checkpoint, entry: Entry, np_dtype: np.dtype) -> np.ndarray:
    """The entry's data as a C-contiguous array of np_dtype (experts: stacked [E, ...])."""
    if len(entry.sources) == 1:
        t = ckpt.get(entry.sources[0], torch.float32, "cpu")
        if entry.permute_heads:
            t = rope_permute(t, entry.permute_heads)
        return np.ascontiguousarray(t.numpy().astype(np_dtype, copy=False))
    out = np.empty(entry.shape, dtype=np_dtype)
    for e, src in enumerate(entry.sources):  # one expert matrix in memory at a time
        out[e] = ckpt.get(src, torch.float32, "cpu").numpy()
    return out


def vocab(tokenizer_path: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and GGUF token types of a SentencePiece model, padded to vocab_size."""
    import sentencepiece as spm
    from gguf import TokenType

    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path}: no tokenizer.model (the GGUF needs the vocabulary)")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    if sp.vocab_size() > vocab_size:
        raise ValueError(f"{tokenizer_path}: {sp.vocab_size()} pieces, more than the config's "
                         f"vocab_size {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                     else TokenType.NORMAL)
    for i in range(vocab_size - sp.vocab_size()):  # rows the model has beyond the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    return tokens, scores, types


def write_metadata(writer, cfg: ModelConfig, name: str, tokenizer_path: Path, file_type: int) -> None:
    """Model hyperparameters and vocabulary (file_type: a gguf.LlamaFileType)."""
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:  # llama.cpp assumes D / heads otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.is_moe:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.experts_per_tok)
    tokens, scores, types = vocab(tokenizer_path, cfg.vocab_size)
    writer.add_tokenizer_model("llama")  # SentencePiece
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for add, value in ((writer.add_bos_token_id, cfg.bos_id), (writer.add_eos_token_id, cfg.eos_id)):
        if value is not None:
            add(value)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)  # Mistral prompts start with BOS, never end with EOS
    writer.add_add_eos_token(False)


def export(model_dir: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Write the GGUF file; returns its path."""
    from gguf import LlamaFileType

    if dtype not in ("f32", "f16"):
        raise ValueError(f"--dtype must be f32 or f16, got {dtype!r}")
    model_dir, out = Path(model_dir), Path(out)
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    entries = plan(cfg)
    with gguf_writer(out) as writer:
        file_type = LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16
        write_metadata(writer, cfg, model_dir.name, model_dir / "tokenizer.model", file_type)
        for e in entries:  # the header lists every tensor before any data is written
            np_dtype = storage_dtype(e.name, e.shape, dtype)
            writer.add_tensor_info(e.name, e.shape, np_dtype, int(np.prod(e.shape)) * np_dtype.itemsize)
        write_tensors(writer, (read(ckpt, e, storage_dtype(e.name, e.shape, dtype)) for e in entries))
    return out


@contextmanager
def gguf_writer(out: Path) -> Iterator:
    """A GGUFWriter on OUT.tmp, renamed to OUT when the block completes and removed if it fails."""
    from gguf import GGUFWriter

    tmp = out.with_name(out.name + ".tmp")
    writer = GGUFWriter(tmp, "llama")
    try:
        yield writer
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def write_tensors(writer, tensors: Iterable[np.ndarray]) -> None:
    """Header, metadata and tensor table (the infos added before), then each tensor's data in order."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path, help="HF checkpoint folder (config.json, safetensors, tokenizer.model)")
    p.add_argument("out", type=Path, help="GGUF file to write")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16"],
                   help="storage of the matrices (norms and routers stay f32)")
    args = p.parse_args(argv)
    path = export(args.model_dir, args.out, args.dtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
