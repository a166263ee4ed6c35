"""`generate --trace-routing`: one record per (token, layer), equal to the reference router."""

from __future__ import annotations

import json

import pytest
import torch

from mixtral_lite.cli.generate import main
from mixtral_lite.model.tokenizer import Tokenizer


@pytest.mark.parametrize("extra", [[], ["--experts-per-layer", "2"]])
def test_trace_matches_reference_router(mixtral_ref, tmp_path, capsys, extra):
    hf, path = mixtral_ref
    trace, stats = tmp_path / "trace.jsonl", tmp_path / "stats.json"
    main(["-m", str(path), "-p", "The garden was quiet", "-n", "6", "--temperature", "0", "--ignore-eos",
          "--trace-routing", str(trace), "--stats-json", str(stats), *extra])
    capsys.readouterr()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    prompt = Tokenizer.from_dir(path).encode("The garden was quiet")
    generated = json.loads(stats.read_text())["generated_ids"]
    layers = hf.config.num_hidden_layers
    fed = prompt + generated[:-1]  # the last generated token is never fed back
    assert len(records) == len(fed) * layers
    with torch.no_grad():
        router_logits = hf(torch.tensor([fed]), output_router_logits=True).router_logits
    by_token: dict[tuple[int, int], dict] = {}
    for r in records:
        t = r["token_pos"] if "token_idx" not in r else len(prompt) + r["token_idx"]
        by_token[(t, r["layer"])] = r
    for layer in range(layers):
        probs = torch.softmax(router_logits[layer].float(), dim=-1)
        top = torch.topk(probs, 2, dim=-1)
        for t in range(len(fed)):
            rec = by_token[(t, layer)]
            assert rec["experts"] == top.indices[t].tolist()
            want = (top.values[t] / top.values[t].sum()).tolist()
            assert rec["gating_probs"] == pytest.approx(want, abs=1e-5)
            assert ("next_guess" in rec) == (layer < layers - 1)
    assert sorted(r["token_idx"] for r in records if "token_idx" in r) == sorted(
        list(range(len(generated) - 1)) * layers)
    assert not (tmp_path / "trace.jsonl.tmp").exists()


def test_trace_on_dense_model_is_an_error(mistral_ref, tmp_path):
    with pytest.raises(SystemExit, match="--trace-routing: the model is dense"):
        main(["-m", str(mistral_ref[1]), "-p", "x", "-n", "1", "--trace-routing", str(tmp_path / "t.jsonl")])
