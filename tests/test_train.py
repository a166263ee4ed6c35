"""The tiny-Mixtral trainer: loss goes down, seed determinism, resume == uninterrupted, HF layout."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_tiny_mixtral", ROOT / "tools" / "train_tiny_mixtral.py")
ttm = importlib.util.module_from_spec(spec)
sys.modules["train_tiny_mixtral"] = ttm
spec.loader.exec_module(ttm)  # puts tools/ on sys.path
import tiny_mixtral as tm  # noqa: E402  (the trainer's model, losses and export)

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters.\n"
) * 6

TINY = ["--hidden", "32", "--intermediate", "48", "--layers", "2", "--heads", "4", "--kv-heads", "2",
        "--seq-len", "32", "--batch", "4", "--warmup", "2", "--lr", "3e-3", "--log-every", "1000",
        "--eval-every", "3", "--threads", "1"]


def run(tmp_path: Path, name: str, *extra: str) -> "tm.TinyMixtral":
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    args = ttm.parse_args(["--train", str(text), "--valid", str(text), "--run-dir", str(tmp_path / name),
                           *TINY, *extra])
    return ttm.train(args)


def losses(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_seed_is_deterministic(tmp_path):
    run(tmp_path, "a", "--total-steps", "12", "--seed", "3")
    run(tmp_path, "b", "--total-steps", "12", "--seed", "3")
    a, b = losses(tmp_path, "a"), losses(tmp_path, "b")
    assert a[-1]["train_loss"] < a[0]["train_loss"] - 1.0
    assert a[-1]["valid_loss"] < a[2]["valid_loss"]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def test_resume_equals_uninterrupted(tmp_path):
    full = run(tmp_path, "full", "--total-steps", "8")
    run(tmp_path, "part", "--total-steps", "8", "--stop-after", "5")
    assert losses(tmp_path, "part")[-1]["step"] == 5
    resumed = run(tmp_path, "part", "--total-steps", "8", "--resume")
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert [r["train_loss"] for r in losses(tmp_path, "part")] == [r["train_loss"] for r in losses(tmp_path, "full")]


def test_chunked_cross_entropy_matches_autograd():
    torch.manual_seed(0)
    h = torch.randn(37, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    tm.ChunkedCrossEntropy.apply(h, w, t, 10).mul(2.0).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    F.cross_entropy(h @ w.t(), t).mul(2.0).backward()
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tm.TinyConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                         tie_word_embeddings=tied, rope_theta=500.0)
    model = tm.TinyMixtral(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a wrong norm-weight name would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    tm.export(model, tmp_path, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["tie_word_embeddings"] is tied
    assert (tmp_path / "tokenizer.model").stat().st_size > 400_000
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert math.isclose(theirs.std().item(), ours.std().item(), rel_tol=1e-3)


def test_load_balancing_loss_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    router = [torch.randn(30, 8) * 2 for _ in range(3)]
    ours = tm.load_balancing_loss(router, 8, 2)
    theirs = load_balancing_loss_func(tuple(router), 8, 2)
    torch.testing.assert_close(ours, theirs)
    balanced = tm.load_balancing_loss([torch.zeros(16, 8)], 8, 2)  # ties -> uniform probs: loss = k
    assert balanced.item() == pytest.approx(2.0)
