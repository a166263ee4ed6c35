"""What a model is, said once to the user: whether it was trained to chat, and how long a text it was trained on.

A Hugging Face checkpoint says it was trained to chat by a `chat_template` in its tokenizer_config.json
(Mixtral-8x7B-Instruct-v0.1 has one; the base Mixtral-8x7B-v0.1 and the shipped Austen model have none);
tools/quantize_experts.py copies that file into the store. The trained context is config.json's
`max_position_embeddings` (512 for the shipped model: its training windows).
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import default_model_path

TOKENIZER_CONFIG = "tokenizer_config.json"


def has_chat_template(model_dir: Path) -> bool:
    """True when the folder's tokenizer_config.json carries a chat template (the model was tuned to chat)."""
    try:
        raw = json.loads((Path(model_dir) / TOKENIZER_CONFIG).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and bool(raw.get("chat_template"))


def chat_note(model_dir: Path) -> str | None:
    """One line for a chat with a model that was not trained to chat; None for an instruction-tuned one."""
    model_dir = Path(model_dir)
    if has_chat_template(model_dir):
        return None
    if model_dir.resolve() == default_model_path().resolve():
        return ("the shipped austen-mixtral is a 15M-parameter model trained on five Jane Austen novels, not on "
                "conversations: it continues your words in Austen's manner and does not follow instructions")
    return (f"{model_dir.name} has no chat template ({TOKENIZER_CONFIG}): it is not known to be trained to chat; "
            "the Mistral Instruct format is used anyway and answers may just continue the text "
            "(Mixtral-8x7B-Instruct-v0.1 is the chat model)")


def context_warning(tokens: int, trained: int) -> str | None:
    """One line when a conversation of `tokens` tokens has passed the `trained` context; else None."""
    if tokens <= trained:
        return None
    return (f"the conversation is {tokens} tokens, past the {trained} the model was trained on "
            "(max_position_embeddings): answers may lose the thread; start a new chat to stay within it")


def describe(model_dir: Path, config, window: int) -> dict:
    """What the server tells its clients (GET /stats: the chat page says it once)."""
    return {"chat_template": has_chat_template(model_dir), "note": chat_note(model_dir),
            "trained_context": config.max_position_embeddings, "window": window}
