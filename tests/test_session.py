"""The model-facing pieces of the server: stop strings, prompt reuse across the rolling window."""

from __future__ import annotations

import pytest

from mixtral_lite.generation.decode import generate
from mixtral_lite.generation.session import Generation, Params, Session
from mixtral_lite.generation.stops import StopStrings
from mixtral_lite.model.tokenizer import Tokenizer
from mixtral_lite.runtime.load import load_model


def test_stop_string_split_over_pieces():
    s = StopStrings(["\n\nThe"])
    assert [s.push(p) for p in ["Hi", "\n", "\nT", "he end"]] == ["Hi", "", "", ""] and s.stopped


def test_held_text_is_released_when_it_is_no_stop():
    s = StopStrings(["abc"])
    assert (s.push("xa"), s.push("bx"), s.push("ab"), s.flush()) == ("x", "abx", "", "ab")


@pytest.mark.parametrize("window", [4096, 30])
def test_reuse_gives_the_same_greedy_tokens(mixtral_ref, window):
    """Turn after turn, with and without the ring wrapping (window 30): equal to a fresh prefill."""
    _, path = mixtral_ref
    model, tok = load_model(path), Tokenizer.from_dir(path)
    session = Session(model, tok, window)
    messages, cached, wrapped = [], [], []
    for q in ["one two", "three four five", "six", "seven"]:
        messages.append({"role": "user", "content": q})
        ids = tok.encode_chat(messages)
        g = Generation(ids, Params(max_tokens=8, ignore_eos=True))
        list(session.run([g]))
        assert g.tokens == generate(model, [ids], 8, window=window)[0]
        cached.append(g.cached_tokens)
        wrapped.append(len(ids) + 7 > window)  # the cache held prompt + 7 fed tokens: did the ring wrap?
        messages.append({"role": "assistant", "content": tok.decode(g.tokens)})
    assert cached[0] == 0
    assert [c > 0 for c in cached[1:]] == [not w for w in wrapped[:-1]]
    assert any(wrapped) == (window == 30)


def test_batch_rows_equal_alone_and_leave_early(mixtral_ref):
    _, path = mixtral_ref
    model, tok = load_model(path), Tokenizer.from_dir(path)
    session = Session(model, tok, 4096)
    gens = [Generation(tok.encode(t), Params(max_tokens=n, ignore_eos=True)) for t, n in [("a b", 3), ("c d e f", 9)]]
    steps = list(session.run(gens))
    assert len(steps) == 9 and [len(s) for s in steps] == [2, 2, 2] + [1] * 6
    for g in gens:
        assert g.tokens == generate(model, [g.ids], g.params.max_tokens, window=4096)[0]
