"""Gemma GGUF tokenizers split text exactly as SentencePiece does, and as llama.cpp does.

Ground truth is a real SentencePiece BPE model trained here with Gemma's options (byte fallback, whitespace-only
pieces, no dummy prefix, runs of spaces/newlines/tabs and HTML tags as user-defined pieces); its pieces and
scores go into a tiny GGUF the way llama.cpp's converter writes a Gemma file (user-defined pieces typed
USER_DEFINED, spelled with real spaces, scored -1000). A real Gemma 3 file was refused on "two  spaces": the
llama.cpp reference merged the "  " token by its -1000 score instead of cutting it out of the text first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.errors import ModelError

from ..conftest import has, needs_onnx
from ..gguf_files import sentencepiece_vocab, train_sentencepiece, write_gguf, write_spm_tokenizer

pytestmark = [pytest.mark.integration, needs_onnx]

# Double, triple and long runs of spaces (Gemma's longest space token is 31), newlines, tabs, a leading and a
# trailing space, accents, an emoji and symbols outside the vocabulary (byte fallback), digits, HTML tags.
TEXTS = ["two  spaces and\nnew line\ttab", " leading space", "trailing  ", "x   y", "a" + " " * 40 + "b",
         "\n\n\nz\t\tq", "naïve café – 😀 ∑ 漢字", "1234567 and 3.14", "<h1>Title</h1><table>",
         "    indented:\n        deeper  # comment", "The Licensor shall  not\n\n  be liable."]


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    return train_sentencepiece()


def _gemma_gguf(tmp: Path, family: str, model: bytes) -> Path:
    from edgepack.testing import make_tiny

    src = make_tiny(family, tmp / "hf")
    vocab = sentencepiece_vocab(model)
    assert len(vocab.tokens) == json.loads((src / "config.json").read_text())["vocab_size"]
    return write_gguf(src, tmp / f"tiny-{family}-sp.Q8_0.gguf", "Q8_0", vocab=vocab)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_converted_tokenizer_matches_sentencepiece(family: str, sp_model: bytes, tmp_path: Path) -> None:
    import sentencepiece as spm
    import transformers

    from edgepack.gguf import convert_gguf, read_gguf_meta
    from edgepack.llama_spm import spm_encode

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    gguf = _gemma_gguf(tmp_path, family, sp_model)
    facts = convert_gguf(gguf, tmp_path / "converted")
    assert (facts.bos_token_id, facts.add_bos_token) == (2, True)
    assert any("whitespace tokens matched whole" in f for f in facts.fixes), facts.fixes
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "converted")
    meta = read_gguf_meta(gguf)
    for text in TEXTS:
        want = sp.encode(text)
        got = tok(text, add_special_tokens=False).input_ids
        assert got == want, (text, tok.convert_ids_to_tokens(got), sp.encode(text, out_type=str))
        assert spm_encode(text, meta) == want, (text, tok.convert_ids_to_tokens(spm_encode(text, meta)))
        assert tok.decode(got) == sp.decode(want) == text
        assert tok(text).input_ids == [2, *want]  # BOS added, as the file says
    # The case, in this vocabulary's pieces: the double space is one token, not "▁" + "▁spaces".
    pieces = tok.convert_ids_to_tokens(tok("two  spaces", add_special_tokens=False).input_ids)
    assert "▁▁" in pieces and pieces == sp.encode("two  spaces", out_type=str)
    run = tok.convert_ids_to_tokens(tok("a" + " " * 40 + "b", add_special_tokens=False).input_ids)
    assert run == ["a", "▁" * 31, "▁" * 9, "b"]
    assert tok.convert_ids_to_tokens(tok("<start_of_turn>user\n", add_special_tokens=False).input_ids)[0] \
        == "<start_of_turn>"


def test_reference_is_llama_cpp_partition_then_score_merges(sp_model: bytes, tmp_path: Path) -> None:
    """The reference cuts user-defined tokens out first: scoring "  " (-1000) as a merge, as it did, gives
    the refused split ['two', '▁', '▁spaces'] shape; SentencePiece and llama.cpp give '▁▁'."""
    from edgepack.gguf import read_gguf_meta
    from edgepack.llama_spm import spm_encode

    meta = read_gguf_meta(_gemma_gguf(tmp_path, "gemma3", sp_model))
    tokens = meta["tokens"]
    ids = spm_encode("two  spaces", meta)
    assert tokens.index("  ") in ids and [tokens[i] for i in ids].count("  ") == 1
    # Typed NORMAL instead (no partition), the same file's "  " never merges: llama.cpp looks tokens up by the
    # text as written, and merging happens on "▁"-escaped text.
    plain = {**meta, "token_type": [1 if t == 4 else t for t in meta["token_type"]]}
    assert tokens.index("  ") not in spm_encode("two  spaces", plain)
    # Bytes outside the vocabulary fall back to <0xNN>, as llama.cpp's byte_to_token.
    assert [tokens[i] for i in spm_encode("😀", meta)] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_long_space_runs_left_to_merges_are_refused(sp_model: bytes, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Left to merges, runs of spaces come out cut differently (transformers' own merges: 40 spaces as 16 + 24,
    where SentencePiece and llama.cpp cut 31 + 9): the check refuses that tokenizer rather than shipping it."""
    import edgepack.gguf as gguf_mod

    monkeypatch.setattr(gguf_mod, "_whole_space_tokens", lambda tok, meta: [])
    with pytest.raises(ModelError, match="where llama.cpp would use"):
        gguf_mod.convert_gguf(_gemma_gguf(tmp_path, "gemma3", sp_model), tmp_path / "converted")


@pytest.mark.skipif(not has("llama_cpp"), reason="needs llama-cpp-python (`make bench` installs it)")
def test_port_matches_llama_cpp_itself(sp_model: bytes, tmp_path: Path) -> None:
    """The port against llama.cpp's own tokenizer (llama-cpp-python, vocabulary only) on the Gemma file and on
    Llama 2-style and Gemma-style vocabularies without user-defined tokens."""
    from llama_cpp import Llama

    from edgepack.gguf import _probes, read_gguf_meta
    from edgepack.llama_spm import spm_encode
    from edgepack.testing import make_tiny

    files = [_gemma_gguf(tmp_path / "sp", "gemma3", sp_model)]
    for family, flavour in (("llama", "llama"), ("gemma2", "gemma")):
        src = make_tiny(family, tmp_path / family)
        files.append(write_gguf(src, tmp_path / f"{flavour}.gguf", "Q8_0",
                                vocab=write_spm_tokenizer(src, flavour=flavour)))
    for gguf in files:
        meta = read_gguf_meta(gguf)
        llama = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        for text in [*TEXTS, *_probes(meta), "", " ", "\n", "a\u00a0b"]:
            assert llama.tokenize(text.encode(), add_bos=False, special=False) == spm_encode(text, meta), \
                (gguf.name, text)
