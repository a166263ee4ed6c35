"""Sliding-window perplexity against a hand computation on a tiny random transformers checkpoint."""

import json
import math

import pytest
import torch

from mixtral_lite.cli.perplexity import main, perplexity, windows
from mixtral_lite.runtime.load import load_model

# ctx 5 = BOS + 4 text tokens, stride 2, 10 text tokens: worked out by hand (module docstring)
HAND_WINDOWS = [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


def test_windows_score_each_token_once():
    assert list(windows(10, 5, 2)) == HAND_WINDOWS
    assert list(windows(10, 64, 8)) == [(0, 10, 0)]
    assert list(windows(7, 3, 2)) == [(0, 2, 0), (2, 4, 2), (4, 6, 4), (6, 7, 6)]
    with pytest.raises(ValueError, match="stride"):
        list(windows(10, 5, 5))  # would skip a token per window


def hand_nll(hf, ids, bos, begin_of):
    """Sum over j of -log softmax(hf logits)[ids[j]], token j seen after BOS + ids[begin_of(j):j]."""
    total = 0.0
    for j in range(len(ids)):
        x = torch.tensor([[bos, *ids[begin_of(j) : j]]])
        with torch.no_grad():
            z = hf(x).logits[0, -1].double()
        m = z.max()
        total += -(z[ids[j]] - m - torch.log(torch.exp(z - m).sum())).item()
    return total


@pytest.mark.parametrize("ctx,stride", [(5, 2), (64, 32)])
def test_perplexity_matches_hand_computation(mixtral_ref, ctx, stride):
    hf, path = mixtral_ref
    ids = torch.randint(3, 32000, (10,), generator=torch.Generator().manual_seed(ctx)).tolist()
    begins = {}
    for begin, end, first in windows(len(ids), ctx, stride):
        begins.update({j: begin for j in range(first, end)})
    assert sorted(begins) == list(range(10))
    if ctx == 5:  # the hand table: tokens 0-3 from window 0, 4-5 from window 2, ...
        assert [begins[j] for j in range(10)] == [0, 0, 0, 0, 2, 2, 4, 4, 6, 6]
    expect = math.exp(hand_nll(hf, ids, 1, begins.__getitem__) / len(ids))
    res = perplexity(load_model(path, dtype=torch.float32), ids, 1, ctx, stride)
    assert res["tokens"] == 10
    assert res["perplexity"] == pytest.approx(expect, rel=1e-5)


def test_cli_json_last_line(mixtral_ref, tmp_path, capsys):
    _, path = mixtral_ref
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune.")
    main(["-m", str(path), "-f", str(text), "--ctx", "8", "--stride", "3", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] > 10 and out["tokens_per_s"] > 0 and out["stride"] == 3
    assert math.isclose(math.log(out["perplexity"]), out["nll"], rel_tol=1e-9)
    with pytest.raises(SystemExit, match="stride"):
        main(["-m", str(path), "-f", str(text), "--ctx", "8", "--stride", "8"])


def test_cli_json_names_the_kernels_a_store_ran_on(mixtral_q_ref, tmp_path, capsys):
    """benchmarks/cpu_capabilities.py reads this to show that each capability ran the int4 kernel, not a
    fallback after a failed self-check."""
    import importlib.util
    from pathlib import Path

    from mixtral_lite.model.qstore import DenseSettings
    from offload.quant import QuantSpec

    spec = importlib.util.spec_from_file_location(
        "quantize_experts", Path(__file__).resolve().parents[1] / "tools" / "quantize_experts.py")
    qe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qe)
    store = tmp_path / "q4"
    qe.convert(str(mixtral_q_ref[1]), str(store), QuantSpec(4, 64, 1, 8),
               DenseSettings(QuantSpec(4, 64, 1, 16), False, 8, 8), progress=False)
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune.")
    main(["-m", str(store), "-f", str(text), "--ctx", "8", "--json", "--no-progress"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kernels"]["int4"] == "fused int4 kernel", out["kernels"]
    assert "int4 kernel" in out["kernels"]["experts"], out["kernels"]
