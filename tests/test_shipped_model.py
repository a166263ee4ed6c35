"""The Austen-trained Mixtral shipped inside the package: loads everywhere alike, and it learned English.

PPL_BOUND is taken from measurement: the shipped model's perplexity on the slice below was
MEASURED_PPL when it was exported (see MODEL_CARD.md); the bound leaves 10% headroom for
numerical differences across CPUs and library versions, and fails for any untrained or damaged model.
"""

import os
import re
from pathlib import Path

import pytest
import torch

from mixtral_lite import default_model_path
from mixtral_lite.cli.perplexity import perplexity
from mixtral_lite.generation.decode import generate
from mixtral_lite.model.tokenizer import Tokenizer
from mixtral_lite.runtime.load import load_model

MODEL = default_model_path()
# the held-out Austen texts; MIXTRAL_LITE_CORPUS=DIR points elsewhere (default: ../shared/data/corpus)
CORPUS = Path(os.environ.get("MIXTRAL_LITE_CORPUS") or Path(__file__).resolve().parents[2] / "shared/data/corpus")
SLICE_TOKENS = 2048  # first text tokens of austen-valid.txt, ctx 512, stride 256
MEASURED_PPL = 47.11  # measured at export (best.pt, step 2550), float32, this CPU
PPL_BOUND = round(MEASURED_PPL * 1.1, 1)

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="shipped model not built")


def needs_corpus(*names: str):
    missing = [CORPUS / n for n in names if not (CORPUS / n).is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"{missing[0] if missing else ''} not found "
                              "(set MIXTRAL_LITE_CORPUS to the folder holding austen-valid.txt and austen-train.txt)")


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL, dtype=torch.float32)


def test_loads_in_mixtral_lite_and_transformers_with_equal_logits(model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    x = torch.randint(3, 32000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-4


def test_size_on_disk_is_at_most_32_mb():
    assert sum(f.stat().st_size for f in MODEL.iterdir()) <= 32_000_000


@needs_corpus("austen-valid.txt")
def test_validation_perplexity_under_measured_bound(model):
    tok = Tokenizer.from_dir(MODEL)
    ids = tok.encode((CORPUS / "austen-valid.txt").read_text(encoding="utf-8"), bos=False)[:SLICE_TOKENS]
    res = perplexity(model, ids, tok.bos_id, ctx=512, stride=256)
    assert res["tokens"] == SLICE_TOKENS
    assert res["perplexity"] <= PPL_BOUND


@needs_corpus("austen-train.txt")
def test_greedy_text_is_mostly_real_words(model):
    tok = Tokenizer.from_dir(MODEL)
    vocab = set(re.findall(r"[a-z]+", (CORPUS / "austen-train.txt").read_text(encoding="utf-8").lower()))
    prompt = tok.encode("The young lady walked into the drawing-room and")
    out = generate(model, [prompt], 50, window=512, temperature=0.0)[0]
    words = re.findall(r"[a-z]+", tok.decode(out).lower())
    assert len(words) >= 20, tok.decode(out)
    known = sum(w in vocab for w in words) / len(words)
    assert known >= 0.8, (known, tok.decode(out))
