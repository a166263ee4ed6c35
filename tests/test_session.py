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


# ---- a row can only fail itself (issue 25) ---------------------------------------------------------------
def _alone(model, tok, gens):
    return [generate(model, [g.ids], g.params.max_tokens, window=4096)[0] for g in gens]


def _batch(tok, seeds=(0, 0, 0)):
    texts = ["a b", "c d e f", "g h i"]
    return [Generation(tok.encode(t), Params(max_tokens=6, ignore_eos=True, seed=s))
            for t, s in zip(texts, seeds, strict=True)]


def test_a_row_whose_start_fails_fails_alone(mixtral_ref):
    _, path = mixtral_ref
    model, tok = load_model(path), Tokenizer.from_dir(path)
    gens = _batch(tok, seeds=(0, 1 << 70, 0))  # a seed torch cannot take (the server refuses it earlier)
    list(Session(model, tok, 4096).run(gens))
    assert gens[1].finish_reason == "error" and "Overflow" in gens[1].error and gens[1].tokens == []
    want = _alone(model, tok, gens)
    assert [gens[0].tokens, gens[2].tokens] == [want[0], want[2]]
    assert gens[0].finish_reason == gens[2].finish_reason == "length"


def test_nan_logits_fail_their_row_alone(mixtral_ref):
    import math

    _, path = mixtral_ref
    model, tok = load_model(path), Tokenizer.from_dir(path)
    gens = _batch(tok)
    want = _alone(model, tok, gens)

    def poison(module, inputs, out):  # row 1's logits go bad from the prompt on (rows keep their order)
        if out.shape[0] == 3:
            out[1] = math.nan
        return out
    hook = model.lm_head.register_forward_hook(poison)
    try:
        list(Session(model, tok, 4096).run(gens))
    finally:
        hook.remove()
    assert gens[1].finish_reason == "error" and "prompt evaluation: the model's logits hold" in gens[1].error
    assert [gens[0].tokens, gens[2].tokens] == [want[0], want[2]]


def test_a_failed_forward_fails_its_rows_and_the_session_goes_on(mixtral_ref):
    _, path = mixtral_ref
    model, tok = load_model(path), Tokenizer.from_dir(path)
    session = Session(model, tok, 4096)
    calls = [0]

    def broken(module, inputs, out):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("device lost")
        return out
    hook = model.lm_head.register_forward_hook(broken)
    gens = _batch(tok)[:1]
    try:
        steps = list(session.run(gens))
    finally:
        hook.remove()
    assert gens[0].finish_reason == "error" and gens[0].error == "RuntimeError: device lost"
    assert len(steps) == 3 and steps[-1] == [(gens[0], "")] and len(gens[0].tokens) == 2  # prefill, 1 step, broken
    again = _batch(tok)[:1]
    list(session.run(again))  # the cache forgot the broken step: a fresh prefill, the reference answer
    assert again[0].tokens == _alone(model, tok, again)[0] and again[0].cached_tokens == 0


def test_ids_past_the_tokenizer_are_never_sampled(mixtral_ref):
    import torch

    _, path = mixtral_ref
    model, tok = load_model(path), Tokenizer.from_dir(path)
    session = Session(model, tok, 4096)
    session.vocab_limit = 100  # as for a model whose vocabulary is padded past a 100-piece tokenizer

    def push_up(module, inputs, out):
        out[..., 100:] += 50.0  # the ids past the limit would win every draw
        return out
    hook = model.lm_head.register_forward_hook(push_up)
    try:
        gens = _batch(tok)
        list(session.run(gens))
    finally:
        hook.remove()
    assert all(g.finish_reason == "length" and max(g.tokens) < 100 for g in gens)
    assert torch.tensor([g.tokens for g in gens]).numel() == 18
