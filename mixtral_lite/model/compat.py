"""The torch this code needs, checked once at import with a message that says what to do.

2.5 is the floor: `scaled_dot_product_attention(enable_gqa=...)` arrived in 2.5 and
`F.rms_norm` in 2.4; on older versions every forward would raise a TypeError mid-run.
"""

from __future__ import annotations

import re

MIN_TORCH = (2, 5)


def torch_version(text: str) -> tuple[int, int]:
    """'2.4.1+cu121' -> (2, 4)."""
    m = re.match(r"(\d+)\.(\d+)", text)
    if m is None:
        raise ValueError(f"unreadable torch version {text!r}")
    return int(m[1]), int(m[2])


def require_torch(version: str | None = None) -> None:
    """Raise ImportError unless torch (or `version`) is at least MIN_TORCH."""
    if version is None:
        import torch

        version = torch.__version__
    if torch_version(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"mixtral-lite needs torch >= {need} (scaled_dot_product_attention with enable_gqa, "
                          f"F.rms_norm); this is torch {version}. Upgrade: pip install 'torch>={need}' "
                          "(from the index of your CUDA version)")
