"""A GGUF file's metadata -> ModelConfig, and its tensor names -> Hugging Face names.

llama.cpp writes Mistral and Mixtral as architecture "llama": `llama.block_count`, `embedding_length`,
`feed_forward_length`, `attention.head_count(_kv)`, `rope.freq_base`, `expert_count` (absent or 0: a
dense Mistral), ... The tensors: `token_embd`, `output_norm`, `output` (absent: tied to token_embd),
per block `attn_norm`, `attn_q/k/v/output`, `ffn_norm`, and either a dense MLP `ffn_gate/up/down` or a
router `ffn_gate_inp` with experts, stacked per layer (`ffn_gate_exps` [E, I, D], `ffn_up_exps`,
`ffn_down_exps`) or, in files converted before mid-2024, one tensor each (`ffn_gate.{e}`, ...).
"""

from __future__ import annotations

from ..config import ModelConfig
from .reader import GGUFError, GGUFFile

ARCH = "llama"
LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate_inp": "block_sparse_moe.gate", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
EXPERTS = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}  # HF role -> GGUF stem (+ "_exps" when stacked)


def model_config(f: GGUFFile) -> ModelConfig:
    """The model's config from the metadata; one error naming the field for anything mixtral-lite cannot run."""
    arch = f.field("general.architecture", str)
    if arch != ARCH:
        raise GGUFError(f"{f.path}: architecture {arch!r} (field 'general.architecture'); mixtral-lite runs "
                        "Mixtral and Mistral GGUFs, whose architecture is 'llama'")

    def need(key: str, default=None) -> int:
        value = f.field(f"{ARCH}.{key}", int, default)
        if value <= 0:
            raise GGUFError(f"{f.path}: field '{ARCH}.{key}' must be a positive integer, got {value}")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv_heads = need("attention.head_count_kv", heads)
    head_dim = need("attention.key_length", hidden // heads)
    if need("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{f.path}: field '{ARCH}.attention.value_length' differs from the key length {head_dim}")
    if need("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{f.path}: field '{ARCH}.rope.dimension_count' is {f.fields[ARCH + '.rope.dimension_count']}"
                        f": RoPE on part of a head of {head_dim} is not supported")
    scaling = f.fields.get(f"{ARCH}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise GGUFError(f"{f.path}: field '{ARCH}.rope.scaling.type' is {scaling!r}: only plain RoPE is supported")
    if heads % kv_heads:
        raise GGUFError(f"{f.path}: field '{ARCH}.attention.head_count_kv' ({kv_heads}) does not divide "
                        f"'{ARCH}.attention.head_count' ({heads})")
    experts = f.field(f"{ARCH}.expert_count", int, 0)
    top_k = need("expert_used_count") if experts else 0
    if top_k > experts:
        raise GGUFError(f"{f.path}: field '{ARCH}.expert_used_count' ({top_k}) exceeds '{ARCH}.expert_count'")
    tokens = f.field("tokenizer.ggml.tokens", list)
    vocab = need("vocab_size", len(tokens))
    eps = f.field(f"{ARCH}.attention.layer_norm_rms_epsilon", float)
    theta = f.field(f"{ARCH}.rope.freq_base", float, 10000.0)
    for key, v in (("attention.layer_norm_rms_epsilon", eps), ("rope.freq_base", theta)):
        if not v > 0:
            raise GGUFError(f"{f.path}: field '{ARCH}.{key}' must be a number > 0, got {v}")
    return ModelConfig(
        arch="mixtral" if experts else "mistral", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=need("feed_forward_length"), num_layers=need("block_count"), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=theta, rms_norm_eps=eps, sliding_window=None,
        max_position_embeddings=need("context_length", 32768), num_experts=experts, experts_per_tok=top_k,
        tie_word_embeddings="output.weight" not in f.tensors, dtype="bfloat16",
        bos_id=f.field("tokenizer.ggml.bos_token_id", int, 1), eos_id=f.field("tokenizer.ggml.eos_token_id", int, 2))


def hf_names(f: GGUFFile, cfg: ModelConfig) -> dict[str, str]:
    """HF name -> GGUF name of every non-expert tensor; a GGUF tensor with no place in the model is an error."""
    out = {hf: g for g, hf in TOP.items() if g in f.tensors}
    for i in range(cfg.num_layers):
        for g, hf in LAYER.items():
            if f"blk.{i}.{g}.weight" in f.tensors:
                out[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    known = set(out.values())
    for name in f.tensors:
        if name in known or _expert_tensor(name, cfg):
            continue
        raise GGUFError(f"{f.path}: tensor {name!r} has no place in a {cfg.arch} model of {cfg.num_layers} layers "
                        "(a file of another model, or one mixtral-lite does not read)")
    return out


def _expert_tensor(name: str, cfg: ModelConfig) -> bool:
    parts = name.split(".")
    if not cfg.is_moe or len(parts) < 4 or parts[0] != "blk" or not parts[1].isdigit():
        return False
    if int(parts[1]) >= cfg.num_layers:
        return False
    stems = set(EXPERTS.values())
    if len(parts) == 4:
        return parts[2].removesuffix("_exps") in stems and parts[2].endswith("_exps") and parts[3] == "weight"
    return len(parts) == 5 and parts[2] in stems and parts[3].isdigit() and parts[4] == "weight"


def expert_tensors(f: GGUFFile, cfg: ModelConfig, layer: int) -> dict[str, tuple[str, int | None]]:
    """role -> (GGUF tensor, expert index inside it, or None for one tensor per expert) for expert 0's layer."""
    out = {}
    for role, stem in EXPERTS.items():
        stacked = f"blk.{layer}.{stem}_exps.weight"
        if stacked in f.tensors:
            out[role] = (stacked, 0)
        elif f"blk.{layer}.{stem}.0.weight" in f.tensors:
            out[role] = (f"blk.{layer}.{stem}.{{e}}.weight", None)
        else:
            raise GGUFError(f"{f.path}: tensor {stacked!r} is missing (and no per-expert {stem}.N tensors)")
    return out
