"""The model: a checkpoint folder in, logits out. Knows nothing of flags, front ends or where experts live.

config.py (validated ModelConfig), checkpoint.py (HF safetensors, lazy), qstore.py + qweights.py (the
quantized store and its dense weights in fused-kernel layouts), transformer.py (RMSNorm, RoPE, GQA
attention, MoE routing), experts.py (the ExpertProvider seam and the resident providers), kv_cache.py
(the rolling cache), tokenizer.py, compat.py (the torch floor), build.py (build_model: tensors into
modules, experts from whatever factory the caller passes).
"""
