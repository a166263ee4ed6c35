"""GGUF files (llama.cpp's format) as mixtral-lite checkpoints: see checkpoint.py."""

from __future__ import annotations

from pathlib import Path

MAGIC = b"GGUF"


def is_gguf(path) -> bool:
    """A file (not a model folder) named *.gguf or starting with GGUF's magic."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC
