"""GGUF sources of every common quantization type and family convert faithfully, tokenizers checked or fixed.

Each case writes a tiny GGUF itself (tests/gguf_files.py), converts it with edgepack's GGUF stage and compares
the converted checkpoint's logits with the original model carrying the GGUF's own dequantized weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import ModelError

from ..conftest import cli, envelope, needs_onnx
from ..gguf_files import FILE_TYPES, dequantized_reference, dequantized_weights, write_gguf, write_spm_tokenizer

pytestmark = [pytest.mark.integration, needs_onnx]

# Logits agree to float32 rounding: the converted weights are the dequantized ones, bit for bit.
TOLERANCE = 1e-5
# 24 tokens: past the tiny sliding window (16), so Gemma 2/3's local layers are exercised.
SEQ = 24
TEXTS = ["Hello world", " leading space", "two  spaces and\nnew line\ttab", "naïve café – 😀 ∑",
         "1234567 and 3.14", "The quick brown fox jumps over the lazy dog."]


def _convert(gguf: Path, tmp: Path):  # type: ignore[no-untyped-def]
    from edgepack.gguf import convert_gguf

    facts = convert_gguf(gguf, tmp / "converted")
    return facts, json.loads((tmp / "converted" / "edgepack-source.json").read_text())


def _logit_gap(src: Path, gguf: Path, converted: Path) -> tuple[float, float]:
    import torch
    import transformers

    ref = dequantized_reference(src, gguf)
    conv = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    assert type(conv).__name__ == type(ref).__name__ or (type(ref).__name__, type(conv).__name__) == (
        "MistralForCausalLM", "LlamaForCausalLM")  # llama.cpp writes Mistral as the llama architecture
    ids = torch.randint(0, ref.config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids).logits, conv(ids).logits
    return float((a - b).abs().max()), float(a.abs().max())


def _quant_error(src: Path, gguf: Path) -> float:
    """Largest weight error relative to the tensor's range: proves the file really holds the quantized type."""
    from safetensors.numpy import load_file

    orig = load_file(str(src / "model.safetensors"))
    deq = dequantized_weights(src, gguf)
    return max(float(np.abs(orig[k] - deq[k]).max() / max(float(np.abs(orig[k]).max()), 1e-6)) for k in deq)


# Largest relative weight error each type may show: a quantizer bug (wrong block layout) shows as ~1.
QUANT_ERROR = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q6_K": 0.04, "Q5_K_M": 0.06, "Q4_K_M": 0.12,
               "Q4_1": 0.12, "Q4_0": 0.15}

CASES = [("llama", t) for t in FILE_TYPES] + [
    (family, t) for family in ("llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
    for t in ("Q8_0", "Q4_K_M")] + [("phi3-longrope", "Q8_0")]


# GGUF files keep llama3 scaling only as a rope_freqs tensor, recovered by matching the released settings; the
# tiny llama3 of TINY_CONFIGS is scaled down (64 original positions), so these files carry Llama 3.2's own.
RELEASED = {"llama3": {"max_position_embeddings": 131072, "rope_parameters": {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}}}


@pytest.mark.parametrize(("family", "ftype"), CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_conversion_is_faithful(family: str, ftype: str, tmp_path: Path) -> None:
    from edgepack.testing import make_tiny

    # K-quant super-blocks are 256 wide, so those files need 256-wide rows; LongRoPE's factors fit width 64.
    hidden = 64 if family == "phi3-longrope" else 256
    src = make_tiny(family, tmp_path / "hf", hidden=hidden, **RELEASED.get(family, {}))
    gguf = write_gguf(src, tmp_path / "gguf" / f"tiny-{family}.{ftype}.gguf", ftype)
    assert _quant_error(src, gguf) < QUANT_ERROR[ftype]
    _, source = _convert(gguf, tmp_path)
    gap, scale = _logit_gap(src, gguf, tmp_path / "converted")
    assert gap <= TOLERANCE, f"{family} {ftype}: converted logits differ by {gap} (logits up to {scale})"
    # What transformers' GGUF reader drops is put back from the file, and said so.
    expected = {"llama3": "rope llama3", "qwen3": "head_dim", "gemma2": "query_pre_attn_scalar",
                "gemma3": "query_pre_attn_scalar", "phi3-longrope": "rope longrope"}.get(family)
    fixes = " ".join(source["config_fixes"])
    assert (expected in fixes) if expected else not fixes, fixes


def _spm_case(tmp_path: Path, family: str, flavour: str):  # type: ignore[no-untyped-def]
    from edgepack.testing import make_tiny

    src = make_tiny(family, tmp_path / "hf")
    vocab = write_spm_tokenizer(src, flavour=flavour)
    gguf = write_gguf(src, tmp_path / f"tiny-{family}-spm.Q8_0.gguf", "Q8_0", vocab=vocab)
    facts, source = _convert(gguf, tmp_path)
    return src, vocab, facts, source


def _same_tokenization(src: Path, converted: Path) -> None:
    import transformers

    want = transformers.AutoTokenizer.from_pretrained(src)
    got = transformers.AutoTokenizer.from_pretrained(converted)
    assert len(got) == len(want)
    for text in TEXTS:
        assert got(text).input_ids == want(text).input_ids, text
        assert got.decode(got(text).input_ids, skip_special_tokens=True) == \
            want.decode(want(text).input_ids, skip_special_tokens=True), text


def test_llama2_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """Llama 2 / TinyLlama vocabulary: <unk> <s> </s>, byte fallback, "▁" prefix, BOS added."""
    src, vocab, facts, source = _spm_case(tmp_path, "llama", "llama")
    assert (facts.bos_token_id, facts.eos_token_id, facts.add_bos_token) == (1, 2, True)
    # transformers' Metaspace drops the second "▁" of " leading" that llama.cpp (and Llama 2) keep: fixed.
    assert any("add_space_prefix=True" in f and "leading space" in f for f in facts.fixes), facts.fixes
    assert source["stop_token_ids"] == [2]
    _same_tokenization(src, tmp_path / "converted")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "converted")
    pieces = tok.convert_ids_to_tokens(tok("😀", add_special_tokens=False).input_ids)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback, not <unk>


def test_gemma_sentencepiece_tokenizer(tmp_path: Path) -> None:
    """Gemma vocabulary: <pad> <eos> <bos> order, no "▁" prefix, end_of_turn as eot, control tokens whole."""
    src, vocab, facts, source = _spm_case(tmp_path, "gemma2", "gemma")
    assert (facts.bos_token_id, facts.eos_token_id, facts.add_bos_token) == (2, 1, True)
    assert source["stop_token_ids"] == [1, vocab.ids["eot"]]  # generation stops at <end_of_turn> too
    import transformers

    gen = json.loads((tmp_path / "converted" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, vocab.ids["eot"]]
    _same_tokenization(src, tmp_path / "converted")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "converted")
    assert tok("<start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False).input_ids[0] == 5


def test_bpe_vocabulary_bos_policy_follows_metadata(tmp_path: Path) -> None:
    import transformers

    from edgepack.gguf import check_tokenizer, read_gguf_meta
    from edgepack.testing import make_tiny

    from ..gguf_files import bpe_vocab

    src = make_tiny("qwen2", tmp_path / "hf")
    vocab = bpe_vocab(src, pre="qwen2")
    vocab.add_bos = True
    gguf = write_gguf(src, tmp_path / "bos.Q8_0.gguf", "Q8_0", vocab=vocab)
    facts, _ = _convert(gguf, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "converted")
    assert facts.add_bos_token and tok("hi").input_ids[0] == vocab.ids["bos"]
    # A tokenizer whose BOS policy disagrees with the file is refused.
    meta = read_gguf_meta(gguf)
    with pytest.raises(ModelError, match="BOS"):
        check_tokenizer(tok, {**meta, "tokenizer.ggml.add_bos_token": False})
    # eos: a converter that got it wrong is fixed from the metadata too.
    tok.eos_token = tok.convert_ids_to_tokens(0)
    assert check_tokenizer(tok, meta).eos_token_id == vocab.ids["eos"]


def test_unknown_rope_factors_are_refused(tmp_path: Path) -> None:
    from edgepack.gguf import convert_gguf
    from edgepack.testing import make_tiny

    src = make_tiny("llama3", tmp_path / "hf")
    odd = np.linspace(1.0, 7.0, 8, dtype=np.float32)  # no llama3 scaling produces these
    gguf = write_gguf(src, tmp_path / "odd-rope.Q8_0.gguf", "Q8_0", rope_freqs=odd)
    with pytest.raises(ModelError, match="rope_freqs"):
        convert_gguf(gguf, tmp_path / "converted")


def test_unsupported_architecture_is_a_user_error(tmp_path: Path) -> None:
    """transformers 5.24 reads no `gemma` (v1) GGUF: exit 1 with a message, not a traceback."""
    from edgepack.testing import make_tiny

    gguf = write_gguf(make_tiny("gemma", tmp_path / "hf"), tmp_path / "gemma.Q8_0.gguf", "Q8_0")
    proc = cli("--json", "build", str(gguf), "--target", "host", "--out", str(tmp_path / "dist"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "architecture gemma is not supported" in envelope(proc)["error"]["message"]
