"""offload: model-agnostic storage, caching and movement of MoE experts."""
