"""mixtral_lite/gguf: the reader against gguf-py, the config and tokenizer from the metadata, and one
error naming the file and the field or tensor for every file it cannot run."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from mixtral_lite.model.gguf.checkpoint import GGUFCheckpoint
from mixtral_lite.model.gguf.config import model_config
from mixtral_lite.model.gguf.reader import GGUFError, GGUFFile
from mixtral_lite.model.gguf.vocab import GGUFTokenizer

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from gguf_export import gguf_writer, plan, write_metadata, write_tensors  # noqa: E402
from gguf_synthetic import config, make_tensor, tensor_type  # noqa: E402

SMALL = dict(vocab=32000, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, experts=4)
TOKENIZER = Path(str(files("mistral_common") / "data" / "tokenizer.model.v1"))
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife.\n\n  Two  spaces,\ttabs, 12345 digits, 3.14159, émigré naïveté, 中文, русский, 🦙 emoji, "
        "[INST] brackets [/INST] <s> literal </s>, trailing spaces   ")


def write(path: Path, edit=None, seed: int = 0, types=tensor_type, extra: dict | None = None) -> Path:
    """A small Mixtral-shaped GGUF (gguf_synthetic's tensors); edit(writer) changes the metadata; extra:
    f32 tensors added after the model's."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    cfg = config(SMALL)
    entries = plan(cfg)
    with gguf_writer(path) as w:
        write_metadata(w, cfg, "small", TOKENIZER, LlamaFileType.MOSTLY_Q4_0)
        if edit:
            edit(w)
        for e in entries:
            q = types(e.name, e.shape)
            if q == "F32":
                w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), int(np.prod(e.shape)) * 4)
                continue
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[q]]
            shape = (*e.shape[:-1], e.shape[-1] // block * size)
            w.add_tensor_info(e.name, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=GGMLQuantizationType[q])
        for name, t in (extra or {}).items():
            w.add_tensor_info(name, t.shape, t.dtype, t.nbytes)
        tensors = [make_tensor(e, i, seed) if types is tensor_type else _blocks(e, types(e.name, e.shape), i)
                   for i, e in enumerate(entries)]
        write_tensors(w, tensors + list((extra or {}).values()))
    return path


def _blocks(entry, q: str, seed: int) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[q]]
    rng = np.random.default_rng(seed)
    return np.frombuffer(rng.bytes(int(np.prod(entry.shape)) // block * size), np.uint8).copy()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("gguf") / "small.gguf", seed=5)


def test_reader_agrees_with_gguf_py(small):
    ours, theirs = GGUFFile(small), gguf.GGUFReader(small)
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        assert ours.tensors[t.name].shape == tuple(int(n) for n in reversed(t.shape))
        assert ours.tensors[t.name].type_name == t.tensor_type.name
        assert np.array_equal(ours.raw(t.name).numpy().reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8))
    for key in ("llama.block_count", "llama.rope.freq_base", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id"):
        assert ours.fields[key] == theirs.get_field(key).contents()
    assert ours.fields["tokenizer.ggml.tokens"] == theirs.get_field("tokenizer.ggml.tokens").contents()
    np.testing.assert_array_equal(ours.fields["tokenizer.ggml.scores"],
                                  np.asarray(theirs.get_field("tokenizer.ggml.scores").contents(), np.float32))


def test_config_from_metadata(small):
    cfg = model_config(GGUFFile(small))
    want = config(SMALL)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "num_experts", "experts_per_tok", "tie_word_embeddings", "bos_id", "eos_id"):
        assert getattr(cfg, field) == getattr(want, field), field
    assert cfg.rope_theta == want.rope_theta and cfg.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)
    assert cfg.arch == "mixtral" and cfg.sliding_window is None


def test_tokenizer_gives_the_original_ids(small):
    tok, ref = GGUFTokenizer(GGUFFile(small)), spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    for text in [TEXT, *TEXT.split(","), "", " ", "\n", "a" * 40]:
        assert tok.encode(text, bos=False) == ref.encode(text), repr(text)
    ids = tok.encode(TEXT)
    assert ids[0] == 1 and tok.decode(ids) == ref.decode(ids[1:]) == TEXT
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert all(tok.sp.is_byte(i) == ref.is_byte(i) and tok.sp.is_control(i) == ref.is_control(i) for i in range(300))
    msgs = [{"role": "user", "content": "Hi there"}]
    assert tok.encode_chat(msgs)[:2] == [1, ref.piece_to_id("▁[")] and tok.chat_unsupported() is None


def test_chat_template_of_another_format_is_refused(tmp_path):
    path = write(tmp_path / "chatml.gguf", lambda w: w.add_chat_template("{% for m in messages %}<|im_start|>..."))
    tok = GGUFTokenizer(GGUFFile(path))
    assert tok.encode("hi") and "not the Mistral [INST] format" in tok.chat_unsupported()
    with pytest.raises(ValueError, match="chatml.gguf: its chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
    mistral = write(tmp_path / "inst.gguf", lambda w: w.add_chat_template("{{ '[INST] ' + m + ' [/INST]' }}"))
    assert GGUFTokenizer(GGUFFile(mistral)).chat_unsupported() is None


def _field_edit(key: str, value=None, kind: str = "string"):
    def edit(w):
        if value is None:
            del w.kv_data[0][key]
        else:
            getattr(w, f"add_{kind}")(key, value)
    return edit


@pytest.mark.parametrize("edit,message", [
    (_field_edit("general.architecture", "qwen2"), "architecture 'qwen2'"),
    (_field_edit("llama.rope.scaling.type", "yarn"), "'llama.rope.scaling.type' is 'yarn'"),
    (_field_edit("llama.block_count"), "field 'llama.block_count' is missing"),
    (_field_edit("llama.rope.dimension_count", 32, "uint32"), "RoPE on part of a head"),
    (_field_edit("llama.attention.head_count_kv", 3, "uint32"), "does not divide"),
    (_field_edit("tokenizer.ggml.model", "gpt2"), "'tokenizer.ggml.model' is 'gpt2'"),
    (_field_edit("llama.feed_forward_length", 256, "uint32"),
     "tensor 'blk.0.ffn_gate_exps.weight' is Q4_0 [4, 512, 256], expected Q4_0 [4, 256, 256]"),
])
def test_metadata_errors_name_the_field(tmp_path, edit, message):
    path = write(tmp_path / "bad.gguf", edit)
    with pytest.raises(GGUFError, match=r"bad\.gguf: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        GGUFCheckpoint(path)
        GGUFTokenizer(GGUFFile(path))


def test_unread_tensor_type_is_named(tmp_path):
    types = lambda name, shape: "IQ4_NL" if "attn_output" in name else tensor_type(name, shape)  # noqa: E731
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_output\.weight' has type IQ4_NL, which"):
        GGUFCheckpoint(write(tmp_path / "iq.gguf", types=types))


def test_extra_tensor_is_named(tmp_path):
    path = write(tmp_path / "extra.gguf", extra={"rope_freqs.weight": np.ones(32, np.float32)})
    with pytest.raises(GGUFError, match="tensor 'rope_freqs.weight' has no place"):
        GGUFCheckpoint(path)


@pytest.mark.parametrize("cut,message", [
    (lambda b: b[: len(b) // 2], r"ends at byte \d+ but the file has \d+ bytes \(truncated download"),
    (lambda b: b[:200], "runs past the end of the file"),
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    (lambda b: b[:4] + (1).to_bytes(4, "little") + b[8:], "GGUF version 1"),
    (lambda b: b[:4] + (3).to_bytes(4, "big") + b[8:], "a big-endian GGUF"),
    (lambda b: b"", "cannot be read"),
])
def test_corrupt_files_are_one_line(small, tmp_path, cut, message):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(cut(small.read_bytes()))
    with pytest.raises(GGUFError, match="corrupt.gguf: .*" + message):
        GGUFFile(bad).raw("blk.1.ffn_down_exps.weight")
