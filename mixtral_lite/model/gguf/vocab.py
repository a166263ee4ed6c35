"""The tokenizer inside a GGUF file: a SentencePiece model rebuilt from its metadata.

llama.cpp's converter writes a SentencePiece vocabulary (`tokenizer.ggml.model` = "llama") as three
arrays, `tokenizer.ggml.tokens` / `scores` / `token_type` (types numbered as SentencePiece numbers them),
plus the BOS/EOS/UNK ids. Those are what a BPE SentencePiece model encodes with, so the model is rebuilt
here as SentencePiece's own ModelProto (serialized by hand: protobuf is not a dependency), with the
settings of Mistral's tokenizer.model that encoding depends on: BPE, byte fallback, whitespace-only pieces
allowed, a dummy prefix unless `tokenizer.ggml.add_space_prefix` is false, no whitespace folding. The
tests check that it gives the ids of the original tokenizer.model on the same text.

The chat format: Mixtral/Mistral Instruct GGUFs carry a Jinja `tokenizer.chat_template`; mixtral-lite
encodes the Mistral [INST] format itself (mixtral_lite/tokenizer.py), so --chat is refused, naming the
template, when the file's template is another format.
"""

from __future__ import annotations

import struct

import sentencepiece as spm

from ..tokenizer import Tokenizer
from .reader import GGUFError, GGUFFile

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece = GGUF numbering
BPE = 2


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 fields are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def model_proto(tokens: list[str], scores, types, unk: int, bos: int, eos: int, dummy_prefix: bool) -> bytes:
    """A serialized sentencepiece.ModelProto (BPE) with these pieces."""
    out = bytearray()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        body = _bytes(1, piece.encode("utf-8")) + _float(2, float(score))
        if int(kind) != NORMAL:
            body += _int(3, int(kind))
        out += _bytes(1, body)
    byte_fallback = any(int(k) == BYTE for k in types)
    trainer = (_int(3, BPE) + _int(4, len(tokens)) + _int(26, 1) + _int(35, int(byte_fallback))
               + _int(40, unk) + _int(41, bos) + _int(42, eos) + _int(43, -1))
    normalizer = _bytes(1, b"identity") + _int(3, int(dummy_prefix)) + _int(4, 0) + _int(5, 1)
    return bytes(out + _bytes(2, trainer) + _bytes(3, normalizer))


class GGUFTokenizer(Tokenizer):
    """mixtral_lite's Tokenizer over the vocabulary stored in a GGUF file."""

    def __init__(self, gguf: GGUFFile):
        where = gguf.path
        kind = gguf.field("tokenizer.ggml.model", str)
        if kind != "llama":
            raise GGUFError(f"{where}: field 'tokenizer.ggml.model' is {kind!r}; mixtral-lite reads SentencePiece "
                            "vocabularies ('llama'), as Mistral and Mixtral GGUFs have")
        tokens = gguf.field("tokenizer.ggml.tokens", list)
        n = len(tokens)
        scores = gguf.fields.get("tokenizer.ggml.scores", [0.0] * n)
        types = gguf.fields.get("tokenizer.ggml.token_type", [NORMAL] * n)
        for key, arr in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
            if len(arr) != n:
                raise GGUFError(f"{where}: field {key!r} has {len(arr)} entries for {n} tokens")
        ids = {k: gguf.field(f"tokenizer.ggml.{k}_token_id", int, d)
               for k, d in (("bos", 1), ("eos", 2), ("unknown", 0))}
        for k, i in ids.items():
            if not 0 <= i < n:
                raise GGUFError(f"{where}: field 'tokenizer.ggml.{k}_token_id' is {i}, outside the {n} tokens")
        proto = model_proto(tokens, scores, types, ids["unknown"], ids["bos"], ids["eos"],
                            gguf.field("tokenizer.ggml.add_space_prefix", bool, True))
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            raise GGUFError(f"{where}: its vocabulary does not make a SentencePiece model ({e})") from None
        self.path = where
        self.bos_id, self.eos_id, self.vocab_size = ids["bos"], ids["eos"], n
        self.chat_template = gguf.fields.get("tokenizer.chat_template")

    def chat_unsupported(self) -> str | None:
        """Why --chat cannot encode this model's chat format (None: it is the Mistral [INST] format)."""
        t = self.chat_template
        if isinstance(t, str) and "[INST]" not in t:
            head = " ".join(t.split())[:60]
            return (f"{self.path}: its chat template ({head!r}...) is not the Mistral [INST] format, the one "
                    "mixtral-lite encodes")
        return None

    def encode_chat(self, messages) -> list[int]:
        why = self.chat_unsupported()
        if why:
            raise ValueError(why)
        return super().encode_chat(messages)
