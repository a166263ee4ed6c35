"""The quantizer's defaults (tools/quantize_experts.py), torch-free so that its --help answers at once.

`--dry-run --bits N` plans the store the quantizer would write with these same settings.
"""

# weights per scale/zero by expert bit width: <= 3.0, <= 3.5, 4.27, 8.25 bits/weight with 8-bit meta
DEFAULT_GROUP = {2: 32, 3: 128, 4: 64, 8: 128}
EXPERT_AXIS, EXPERT_META_BITS = 1, 8  # groups along the input (what the fused kernels read), 8-bit scale/zero
ATTN_BITS, ATTN_GROUP = 4, 64  # attention projections: int4 g64 (fp16 scale/zero)
HEAD_BITS, EMBED_BITS = 8, 8  # lm_head and token embeddings: int8, one scale per row
