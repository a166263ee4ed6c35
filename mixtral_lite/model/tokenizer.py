"""SentencePiece tokenizer, the Mistral/Mixtral Instruct chat format and a streaming detokenizer.

The chat format is mistral_common's v1 instruct encoding (the one Mixtral-8x7B-Instruct and
Mistral-7B-Instruct were trained with), reproduced token for token:

    [BOS] enc("[INST] {user} [/INST]") enc("{answer}") [EOS] enc("[INST] {user2} [/INST]") ...

where enc() is SentencePiece *without* BOS/EOS (its dummy prefix turns "{answer}" into "▁answer", i.e. the
space after "[/INST]"). An optional leading system message is folded into the first user turn as
"{system}\n\n{user}", exactly as mistral_common's InstructTokenizerV1 does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    """A SentencePiece `tokenizer.model` with Mistral's BOS/EOS conventions."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a valid SentencePiece model ({e})") from e
        self.path = path
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.vocab_size()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.model` from a checkpoint folder."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model folder not found: {model_dir}")
        return cls(model_dir / TOKENIZER_FILE)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; control tokens (BOS/EOS) decode to nothing, as in SentencePiece."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.vocab_size}) for {self.path}")
        return self.sp.decode(ids)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation in the Mistral Instruct (v1) format, ready for generation."""
        turns = _chat_turns(messages)
        ids = [self.bos_id]
        for i, (user, answer) in enumerate(turns):
            ids += self.sp.encode(f"[INST] {user} [/INST]")
            if answer is not None:
                ids += self.sp.encode(answer) + [self.eos_id]
            elif i != len(turns) - 1:
                raise AssertionError("only the last turn may be unanswered")
        return ids


def _chat_turns(messages: Sequence[dict]) -> list[tuple[str, str | None]]:
    """[(user, answer | None)] from role/content dicts; validates the order; folds the system prompt in."""
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"chat message {i} must be a dict with 'role' and a str 'content', got {m!r}")
    system = None
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    if not msgs:
        raise ValueError("a chat needs at least one user message")
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            where = i + (system is not None)
            raise ValueError(
                f"chat message {where} has role {m['role']!r}, expected {want!r}: after an optional leading "
                "'system' message, roles must alternate user/assistant starting with user"
            )
    if msgs[-1]["role"] != "user":
        raise ValueError("a chat must end with a user message (the model writes the answer)")
    users = [m["content"] for m in msgs[0::2]]
    answers: list[str | None] = [m["content"] for m in msgs[1::2]] + [None]
    if system:
        users[0] = f"{system}\n\n{users[0]}"
    return list(zip(users, answers, strict=True))


def _utf8_len(lead: int) -> int:
    """Length of the UTF-8 sequence a lead byte announces (1 for ASCII and stray continuation bytes)."""
    return 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 1


class StreamingDetokenizer:
    """Turns token ids into text as soon as the text is final.

    The concatenation of everything `push` and `flush` return equals `tokenizer.decode(all_ids)`.
    Only a short tail window is decoded per token. The window always starts at an *anchor*: a piece
    whose text does not depend on what comes before it (not a control token, which would leave
    SentencePiece's "strip the first ▁" state untouched; not a UTF-8 continuation byte, which would
    split a byte-fallback character). Before the first anchor the window is the whole sequence, so the
    first piece's leading "▁" is dropped exactly as `decode` drops it. Text is emitted by diffing the
    window's decode against what was already emitted from it; while the trailing byte-fallback run could
    still become a different character, nothing is emitted.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        sp = tokenizer.sp
        n = tokenizer.vocab_size
        # byte value of each byte-fallback piece ("<0xE2>" -> 0xE2), -1 for other pieces
        self._byte = [int(sp.id_to_piece(i)[3:5], 16) if sp.is_byte(i) else -1 for i in range(n)]
        self._control = [sp.is_control(i) for i in range(n)]
        self._reset()

    def _reset(self) -> None:
        self._window: list[int] = []  # ids from the current anchor (or the start) to the end
        self._done = 0  # characters of decode(self._window) already emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final."""
        token_id = int(token_id)
        if not 0 <= token_id < self.tok.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.tok.vocab_size})")
        self._window.append(token_id)
        if self._byte_run_open():
            return ""
        text = self.tok.sp.decode(self._window)
        out, self._done = text[self._done :], len(text)
        self._reanchor()
        return out

    def flush(self) -> str:
        """Return the remaining text (held bytes become U+FFFD as in `decode`) and start a new sequence."""
        out = self.tok.sp.decode(self._window)[self._done :] if self._window else ""
        self._reset()
        return out

    def _is_anchor(self, token_id: int) -> bool:
        b = self._byte[token_id]
        return not self._control[token_id] and not 0x80 <= b < 0xC0

    def _byte_run_open(self) -> bool:
        """True while the trailing byte pieces end in an unfinished multi-byte UTF-8 character."""
        w = self._window
        for back in range(1, min(4, len(w)) + 1):
            b = self._byte[w[-back]]
            if b < 0:  # a non-byte piece ends the run: any unfinished character is already broken
                return False
            if not 0x80 <= b < 0xC0:  # lead byte (or ASCII): open if it announces more bytes than follow
                return _utf8_len(b) > back
        return False  # four continuation bytes in a row: no character can still complete

    def _reanchor(self) -> None:
        """Move the window start to its last anchor, so the next decode stays a few tokens long."""
        w = self._window
        j = next((j for j in range(len(w) - 1, -1, -1) if self._is_anchor(w[j])), None)
        if j is None and all(self._control[i] for i in w):
            self._window, self._done = [], 0  # leading control tokens decode to nothing and change no state
        elif j:
            self._window = w[j:]
            self._done = len(self.tok.sp.decode(self._window))
