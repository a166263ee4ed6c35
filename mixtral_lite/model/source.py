"""What -m names: a Hugging Face checkpoint folder, a quantized store (a folder), or a GGUF file.

    read_config(path)      ModelConfig from config.json, or from a GGUF's metadata (no weight is read)
    open_tokenizer(path)   tokenizer.model, or the vocabulary inside a GGUF
    model_unreadable(path) why -m cannot take this path (None: it can), one line naming it
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ModelConfig
from .gguf import is_gguf
from .tokenizer import Tokenizer


def read_config(path: str | Path) -> ModelConfig:
    if is_gguf(path):
        from .gguf.config import model_config
        from .gguf.reader import GGUFFile

        return model_config(GGUFFile(path))
    return ModelConfig.from_dir(path)


def open_tokenizer(path: str | Path) -> Tokenizer:
    if is_gguf(path):
        from .gguf.reader import GGUFFile
        from .gguf.vocab import GGUFTokenizer

        return GGUFTokenizer(GGUFFile(path))
    return Tokenizer.from_dir(path)


def model_unreadable(path: Path) -> str | None:
    """Why `path` is not something -m reads (None: a folder with config.json, or a GGUF file)."""
    if not path.exists():
        return f"{path} does not exist"
    if path.is_file():
        if is_gguf(path):
            return None if os.access(path, os.R_OK) else f"{path}: permission denied"
        return f"{path} is a file, neither a model folder nor a GGUF file (*.gguf)"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"{path}: permission denied (the folder is not readable)"
    if not (path / "config.json").is_file():
        return f"{path} is not a model folder (no config.json)"
    return None
