"""Tokenizer, Mistral Instruct chat format and streaming detokenizer, on the real Mixtral tokenizer."""

import importlib.resources
import random
import shutil

import pytest

from mixtral_lite.model.tokenizer import StreamingDetokenizer, Tokenizer

MODEL = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL)


@pytest.fixture(scope="module")
def detok(tok) -> StreamingDetokenizer:
    return StreamingDetokenizer(tok)


def stream(detok: StreamingDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push(i) for i in ids] + [detok.flush()]


# --- plain encode / decode -----------------------------------------------------------------------


def test_mixtral_special_ids_and_pieces(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_id
    assert [tok.sp.id_to_piece(i) for i in ids[1:]] == ["▁Hello", "▁world"]
    assert tok.encode("Hello world", bos=False) == ids[1:]


@pytest.mark.parametrize(
    "text", ["Hello world", "  two leading spaces", "héllo ça va? naïve", "😀 日本語 ₂ 🦜", "a\n\n\tb", ""]
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text) + [tok.eos_id]) == text  # control tokens decode to nothing


def test_from_dir(tok, tmp_path):
    shutil.copy(MODEL, tmp_path / "tokenizer.model")
    assert Tokenizer.from_dir(tmp_path).encode("Mixtral") == tok.encode("Mixtral")


def test_errors_name_the_path(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nope"):
        Tokenizer.from_dir(tmp_path / "nope")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(MODEL.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=f"{bad}: not a valid SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="token id 32000 out of range"):
        tok.decode([5, 32000])


# --- chat format ---------------------------------------------------------------------------------

# Reference ids produced by mistral_common 1.13.1 itself: MistralTokenizer.v1().encode_chat_completion(
# ChatCompletionRequest(messages=[SystemMessage/UserMessage/AssistantMessage ...])).tokens
CHATS = [
    ([dict(role="user", content="Hello")], "1 733 16289 28793 22557 733 28748 16289 28793"),
    (
        [
            dict(role="system", content="Be brief."),
            dict(role="user", content="Hello there"),
            dict(role="assistant", content="Hi! How can I help?"),
            dict(role="user", content="Tell me a joke"),
        ],
        "1 733 16289 28793 1739 6817 28723 13 13 16230 736 733 28748 16289 28793 15359 28808 1602 541 315"
        " 1316 28804 2 733 16289 28793 15259 528 264 13015 733 28748 16289 28793",
    ),
    (
        [
            dict(role="user", content=" héllo 😀\n日本語 "),
            dict(role="assistant", content="  two\nlines "),
            dict(role="user", content="[INST] x"),
        ],
        "1 733 16289 28793 28705 295 28797 584 28709 28705 30575 13 29142 29119 30321 28705 733 28748 16289"
        " 28793 259 989 13 8063 28705 2 733 16289 28793 733 16289 28793 1318 733 28748 16289 28793",
    ),
]


@pytest.mark.parametrize("messages,expected", CHATS)
def test_chat_matches_mistral_common_reference_ids(tok, messages, expected):
    assert tok.encode_chat(messages) == [int(i) for i in expected.split()]


@pytest.mark.parametrize("messages,expected", CHATS)
def test_chat_matches_live_mistral_common(tok, messages, expected):
    try:  # needs mistral_common's full dependencies (requests, PIL, jsonschema ...)
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    except ImportError as e:
        pytest.skip(f"mistral_common instruct encoder not importable: {e}")
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    assert tok.encode_chat(messages) == [int(i) for i in expected.split()]
    assert tok.encode_chat(messages) == MistralTokenizer.v1().encode_chat_completion(request).tokens


def test_chat_layout(tok):
    """BOS once, each answer followed by EOS, each turn text encoded without BOS."""
    ids = tok.encode_chat(
        [dict(role="user", content="a"), dict(role="assistant", content="b"), dict(role="user", content="c")]
    )
    enc = lambda s: tok.encode(s, bos=False)  # noqa: E731
    assert ids == [tok.bos_id, *enc("[INST] a [/INST]"), *enc("b"), tok.eos_id, *enc("[INST] c [/INST]")]
    assert tok.decode(ids) == "[INST] a [/INST] b [INST] c [/INST]"


@pytest.mark.parametrize(
    "roles,match",
    [
        ([], "at least one user message"),
        (["system"], "at least one user message"),
        (["assistant"], "message 0 has role 'assistant', expected 'user'"),
        (["user", "user"], "message 1 has role 'user', expected 'assistant'"),
        (["system", "user", "system", "user"], "message 2 has role 'system', expected 'assistant'"),
        (["user", "assistant"], "must end with a user message"),
        (["user", "robot"], "role 'robot'"),
    ],
)
def test_chat_role_errors(tok, roles, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat([dict(role=r, content="x") for r in roles])


def test_chat_message_shape_error(tok):
    with pytest.raises(ValueError, match="chat message 0 must be a dict with 'role' and a str 'content'"):
        tok.encode_chat([dict(role="user")])


# --- streaming detokenizer -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        'The quick brown fox jumps over the lazy dog. It said: "Hi!"\n\nNew paragraph.',
        "Café crème, naïve façade, Ångström, Žluťoučký kůň",
        "emoji 🦜🧬🫠 and CJK 鱻龘 齉 — ₂₃ ⁂",
    ],
)
def test_stream_equals_full_decode(tok, detok, text):
    ids = tok.encode(text)
    pieces = stream(detok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not pieces[0].startswith(" ")  # the first piece's "▁" is dropped, as decode drops it


def test_byte_fallback_is_used_and_held(tok, detok):
    ids = tok.encode("🫠", bos=False)
    assert [tok.sp.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0xAB>", "<0xA0>"]
    out = stream(detok, ids)
    assert out[:-2] == [""] * (len(ids) - 1) and out[-2:] == ["🫠", ""]


def test_held_bytes_wait_then_complete_mid_sentence(tok, detok):
    ids = tok.encode("ok 鱻 ok", bos=False)  # "鱻" is three byte-fallback pieces
    pieces = [tok.sp.id_to_piece(i) for i in ids]
    first = pieces.index("<0xE9>")
    out = stream(detok, ids)
    assert out[first : first + 2] == ["", ""] and out[first + 2].endswith("鱻")
    assert "".join(out[:first]) == "ok "[: len("".join(out[:first]))]  # nothing past the held char leaked
    assert "".join(out) == "ok 鱻 ok"


def test_incomplete_bytes_flush_like_decode(tok, detok):
    ids = [tok.sp.piece_to_id(p) for p in ["▁hi", "<0xE2>", "<0x82>"]]
    assert detok.push(ids[0]) == "hi"
    assert detok.push(ids[1]) == "" and detok.push(ids[2]) == ""
    assert detok.flush() == tok.decode(ids)[2:] == "\ufffd\ufffd"


def test_flush_starts_a_new_sequence(tok, detok):
    a, b = tok.encode("first"), tok.encode("second")
    assert "".join(stream(detok, a)) == "first"
    assert "".join(stream(detok, b)) == "second"


def test_random_ids_stream_equals_decode(tok, detok):
    """Property test: random ids (heavy on control, unknown and byte pieces) stream to decode(ids)."""
    rng = random.Random(1234)
    special = [0, tok.bos_id, tok.eos_id, *range(3, 259)]  # unk, BOS, EOS, the 256 byte pieces
    for _ in range(400):
        n = rng.randint(1, 30)
        ids = [rng.choice(special) if rng.random() < 0.6 else rng.randrange(tok.vocab_size) for _ in range(n)]
        assert "".join(stream(detok, ids)) == tok.decode(ids), ids


def test_valid_utf8_byte_runs_stream_equals_decode(tok, detok):
    """Byte-fallback runs of real characters of every UTF-8 length, mixed with ordinary pieces."""
    rng = random.Random(99)
    chars = ["é", "€", "鱻", "🫠", "\x7f", "ß"]
    for _ in range(100):
        ids = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.5:
                ids += [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in rng.choice(chars).encode()]
            else:
                ids.append(rng.randrange(259, tok.vocab_size))
        assert "".join(stream(detok, ids)) == tok.decode(ids), ids


class _CountingSP:
    """Delegates to a SentencePieceProcessor, counting the ids passed to decode."""

    def __init__(self, sp):
        self.sp, self.decoded = sp, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.sp.decode(ids)

    def __getattr__(self, name):
        return getattr(self.sp, name)


def test_stream_decodes_only_a_short_tail(tok):
    counted = Tokenizer(MODEL)
    counted.sp = _CountingSP(counted.sp)
    detok = StreamingDetokenizer(counted)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40 + "🫠 鱻")
    text = "".join(stream(detok, ids))
    assert text == tok.decode(ids)
    assert counted.sp.decoded < 6 * len(ids)  # O(n), not O(n^2) (~n^2/2 = 100k ids for a full re-decode)
