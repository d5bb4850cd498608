"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them, and their dequantized truth.

`write_gguf(folder, out, "Q4_K_M")` turns a tiny HF checkpoint (edgepack.testing.make_tiny) into a GGUF of one
quantization type: llama.cpp tensor names (gguf-py's own name map), llama.cpp's value transforms (Q/K rows
permuted for the llama architecture, Gemma norms stored as 1 + w), the per-architecture metadata keys and the
tokenizer as `tokenizer.ggml.*` arrays. `dequantized_reference(folder, gguf)` is the ground truth a conversion
must match: the original model class and config, with every weight replaced by the GGUF's own bytes run
through gguf.quants.dequantize and llama.cpp's transforms undone.

gguf-py quantizes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16 and F16 but not the K-quants, so `quantize_k` writes
Q4_K, Q5_K and Q6_K super-blocks with numpy (a plain min/max fit, not llama.cpp's search: what matters here
is that the bytes are valid blocks that gguf-py's dequantizer reads back close to the original weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

QK_K = 256
# HF model_type → llama.cpp architecture name. Mistral has no architecture of its own in llama.cpp: its
# converter writes `llama` (transformers tells them apart only by general.name).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
NORM_PLUS_ONE = {"gemma", "gemma2", "gemma3"}  # llama.cpp stores these architectures' RMSNorm weights as 1 + w
# llama.cpp's file types ("ftype") and the tensor type each puts on most 2-D weights; `_M` mixtures move
# output, attn_v and ffn_down of the first layer to Q6_K the way llama_tensor_get_type() favours them.
FILE_TYPES: dict[str, tuple[int, str, str | None]] = {
    "F16": (1, "F16", None), "BF16": (32, "BF16", None), "Q8_0": (7, "Q8_0", None), "Q4_0": (2, "Q4_0", None),
    "Q4_1": (3, "Q4_1", None), "Q4_K_M": (15, "Q4_K", "Q6_K"), "Q5_K_M": (17, "Q5_K", "Q6_K"),
    "Q6_K": (18, "Q6_K", None),
}


# ---- K-quant blocks (numpy) -------------------------------------------------------------------------------

def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _affine_k(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins; returns (d, dmin, sc, mn, q)."""
    sub = blocks.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / levels
    d = scale.max(-1) / 63
    dmin = (-lo).max(-1) / 63
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d16 > 0, d16, 1)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / np.where(dmin16 > 0, dmin16, 1)[:, None]), 0, 63).astype(np.uint8)
    step = (d16[:, None] * sc)[..., None]
    q = np.round((sub + (dmin16[:, None] * mn)[..., None]) / np.where(step > 0, step, 1))
    return d, dmin, np.stack([sc, mn]), np.clip(q, 0, levels).astype(np.uint8)


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    # the 12-byte layout gguf-py's Q4_K.get_scale_min unpacks
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([a, b, c], axis=1).astype(np.uint8)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, (sc, mn), q = _affine_k(blocks, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, mn), qs], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, (sc, mn), q = _affine_k(blocks, 31)
    low = q & 0x0F
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= ((q[:, j] >> 4) & 1) << j
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, mn), qh, qs], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = scale.max(-1) / 127
    d16 = d.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d16 > 0, d16, 1)[:, None]), 0, 127).astype(np.int8)
    step = (d16[:, None] * sc)[..., None]
    q = (np.clip(np.round(sub / np.where(step > 0, step, 1)), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    low, high = q & 0x0F, q >> 4
    ql = np.concatenate([low[:, h * 128:h * 128 + 64] | (low[:, h * 128 + 64:h * 128 + 128] << 4)
                         for h in range(2)], axis=1)
    qh = np.concatenate([sum((high[:, h * 128 + s * 32:h * 128 + s * 32 + 32] << (2 * s) for s in range(4)),
                             np.zeros((q.shape[0], 32), np.uint8)) for h in range(2)], axis=1).astype(np.uint8)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)


K_QUANTIZERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """Bytes of `data` (rows × columns, float32) as GGML type `type_name`, shaped rows × bytes-per-row."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name not in K_QUANTIZERS:
        return np.asarray(gguf.quants.quantize(data.astype(np.float32), qtype))
    rows, cols = data.shape
    assert cols % QK_K == 0, f"{type_name} needs rows that are a multiple of {QK_K} wide, not {cols}"
    blocks = K_QUANTIZERS[type_name](data.astype(np.float32).reshape(-1, QK_K))
    return blocks.reshape(rows, -1)


# ---- tokenizers ----------------------------------------------------------------------------------------------

@dataclass
class GgufVocab:
    """What llama.cpp writes under tokenizer.ggml.*, and the HF tokenizer it was made from."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    token_types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    ids: dict[str, int | None] = field(default_factory=dict)  # bos, eos, unk, pad, eot
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None


def bpe_vocab(folder: Path, *, pre: str = "smollm") -> GgufVocab:
    """The byte-level BPE of a make_tiny folder, as llama.cpp's gpt2 vocabulary (with merges)."""
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = tok["model"]["vocab"]
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return GgufVocab(model="gpt2", tokens=tokens, token_types=[3 if t in special else 1 for t in tokens],
                     merges=merges, pre=pre, add_bos=bool(cfg.get("add_bos_token", False)),
                     ids={"bos": vocab[cfg["bos_token"]], "eos": vocab[cfg["eos_token"]],
                          "unk": vocab.get(cfg.get("unk_token", "")), "pad": vocab.get(cfg.get("pad_token", ""))})


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def write_spm_tokenizer(folder: Path, *, flavour: str = "llama", vocab_size: int = 512) -> GgufVocab:
    """Replace a make_tiny folder's tokenizer with a SentencePiece-style one (BPE pieces on ▁, byte fallback).

    flavour "llama" is Llama 2 / TinyLlama: <unk> <s> </s> then the 256 byte tokens, BOS added, EOS not.
    flavour "gemma" is Gemma: <pad> <eos> <bos> <unk> <mask>, <start_of_turn>/<end_of_turn> as control tokens
    (end_of_turn is llama.cpp's eot), then the byte tokens, BOS added, no "▁" prepended (add_space_prefix false).
    Scores are SentencePiece's for a BPE model: 0 for control/byte tokens, -rank for pieces.
    """
    import tokenizers
    from tokenizers import decoders, normalizers, pre_tokenizers

    from edgepack.quality.texts import heldout

    if flavour == "llama":
        specials = ["<unk>", "<s>", "</s>"]
        control, ids = {"<s>", "</s>"}, {"unk": 0, "bos": 1, "eos": 2}
        bos, eos, pad = "<s>", "</s>", None
    else:
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
        control = {"<pad>", "<eos>", "<bos>", "<mask>", "<start_of_turn>", "<end_of_turn>"}
        ids = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "eot": 6}
        bos, eos, pad = "<bos>", "<eos>", "<pad>"
    trainer_tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=specials[ids["unk"]]))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size - len(specials) - 256, show_progress=False)
    trainer_tok.train_from_iterator(heldout().text.splitlines(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1])]
    tokens = specials + BYTE_TOKENS + [p for p in pieces if p not in specials and p not in BYTE_TOKENS]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in trained["merges"]]
    model = tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token=specials[ids["unk"]], byte_fallback=True,
                                  fuse_unk=True)
    tok = tokenizers.Tokenizer(model)
    prefix = flavour == "llama"
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in sorted(control)])
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "unk_token": specials[ids["unk"]], "pad_token": pad, "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 2048}, indent=2))
    types = [3 if t in control else 2 if t == specials[ids["unk"]] else 6 if t in BYTE_TOKENS else 1
             for t in tokens]
    scores = [0.0 if ty != 1 else -float(i) for i, ty in enumerate(types)]
    return GgufVocab(model="llama", tokens=tokens, token_types=types, scores=scores, pre="default",
                     ids=dict(ids), add_bos=True, add_eos=False, add_space_prefix=prefix)


# Gemma's kinds of user-defined pieces (its ids 108-255 or so): newline and tab runs, runs of 2-31 spaces
# (SentencePiece spells them "▁▁"...), HTML tags; and its control pieces past <pad> <eos> <bos> <unk>.
GEMMA_USER_DEFINED = (["\n", "\n\n", "\n\n\n", "\t", "\t\t"] + ["▁" * n for n in range(2, 32)]
                      + ["<h1>", "</h1>", "<table>"])
GEMMA_CONTROL = ["<mask>", "<start_of_turn>", "<end_of_turn>"]


def train_sentencepiece(vocab_size: int = 512) -> bytes:
    """A real SentencePiece BPE model (the serialized tokenizer.model) trained on the held-out text with Gemma's
    trainer options: byte fallback, whitespace-only pieces allowed, digits split, no dummy prefix, no whitespace
    clean-up, identity normalization, Gemma's special-token order and its kinds of user-defined pieces."""
    import io

    import sentencepiece as spm

    from edgepack.quality.texts import heldout

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(heldout().text.splitlines()), model_writer=out, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, allow_whitespace_only_pieces=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        character_coverage=1.0, user_defined_symbols=GEMMA_USER_DEFINED, control_symbols=GEMMA_CONTROL,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", num_threads=1, minloglevel=2)
    return out.getvalue()


def sentencepiece_vocab(model: bytes) -> GgufVocab:
    """What llama.cpp's convert_hf_to_gguf.py writes for a Gemma checkpoint with this tokenizer.model
    (_create_vocab_sentencepiece): each piece with its SentencePiece score and type; then every piece the HF
    tokenizer_config.json lists in added_tokens_decoder (Gemma's control and user-defined pieces) gets score
    -1000, special ones become CONTROL, the others USER_DEFINED with "▁" written back as " " ("pre-normalize
    user-defined spaces"). Gemma 3's set_vocab adds add_space_prefix = false."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    tokens, types, scores = [], [], []
    for i in range(sp.get_piece_size()):
        piece, score = sp.id_to_piece(i), float(sp.get_score(i))
        if sp.is_control(i) or sp.is_unknown(i):
            kind, score = 3, -1000.0
        elif piece in GEMMA_USER_DEFINED:
            kind, score, piece = 4, -1000.0, piece.replace("▁", " ")
        else:
            kind = 6 if sp.is_byte(i) else 1
        tokens.append(piece)
        types.append(kind)
        scores.append(score)
    ids: dict[str, int | None] = {"pad": 0, "eos": 1, "bos": 2, "unk": 3, "eot": sp.piece_to_id("<end_of_turn>")}
    return GgufVocab(model="llama", tokens=tokens, token_types=types, scores=scores, pre="default", ids=ids,
                     add_bos=True, add_eos=False, add_space_prefix=False)


# ---- the file ------------------------------------------------------------------------------------------------

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows → llama.cpp's interleaved pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / "config.json").read_text(encoding="utf-8")))


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = cfg.get("rope_parameters") or {}
    return dict(rope.get("full_attention", rope)) if "full_attention" in rope else dict(rope)


def _llama3_rope_factors(cfg: dict[str, Any]) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: the llama3 scaling as a per-frequency tensor
    rope = _rope(cfg)
    base, dim = float(rope.get("rope_theta", 10000.0)), _head_dim(cfg)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs:
        wl = 2 * np.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _metadata(w: Any, arch: str, cfg: dict[str, Any]) -> None:
    import gguf

    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    hd = _head_dim(cfg)
    w.add_key_length(hd)
    w.add_value_length(hd)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
        w.add_vocab_size(cfg["vocab_size"])
    if arch == "phi3":
        w.add_rope_dimension_count(hd)
        w.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings")
                                        or cfg.get("original_max_position_embeddings", cfg["max_position_embeddings"]))
    if arch in ("gemma2", "gemma3") and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    del gguf


def _tokenizer_metadata(w: Any, v: GgufVocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre is not None:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.token_types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges is not None:
        w.add_token_merges(v.merges)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
               "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}
    for key, token_id in v.ids.items():
        if token_id is not None:
            setters[key](token_id)
    if v.add_bos is not None:
        w.add_add_bos_token(v.add_bos)
    if v.add_eos is not None:
        w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)


def _hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(folder / "model.safetensors")))


def gguf_name(arch: str, hf_name: str, n_layers: int) -> str | None:
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    base, _, suffix = hf_name.rpartition(".")
    mapped = gguf.get_tensor_name_map(arch_id, n_layers).get_name(base)
    return None if mapped is None else f"{mapped}.{suffix}"


# llama.cpp's fallback for a tensor whose rows are not a multiple of 256 wide (llama_tensor_get_type).
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _tensor_type(gguf_name_: str, shape: tuple[int, ...], ftype: str) -> str:
    _, base, mixed = FILE_TYPES[ftype]
    if len(shape) < 2:
        return "F32"
    chosen = base
    if mixed and (gguf_name_.startswith("output.") or gguf_name_.startswith(("blk.0.attn_v", "blk.0.ffn_down"))):
        chosen = mixed
    return K_FALLBACK[chosen] if chosen in K_FALLBACK and shape[-1] % QK_K else chosen


def write_gguf(folder: Path, out: Path, ftype: str, *, vocab: GgufVocab | None = None, name: str | None = None,
               rope_freqs: np.ndarray | None = None) -> Path:
    """A GGUF of the HF checkpoint in `folder`, quantized as llama.cpp's `ftype` (a FILE_TYPES key).

    `rope_freqs` replaces the llama3 rope-factor tensor (to write one no llama3 scaling produces)."""
    import gguf

    cfg = _config(folder)
    arch = GGUF_ARCH[cfg["model_type"]]
    vocab = vocab or bpe_vocab(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name or f"tiny {cfg['model_type']}")
    w.add_file_type(FILE_TYPES[ftype][0])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _metadata(w, arch, cfg)
    _tokenizer_metadata(w, vocab)
    n_layers, heads, kv_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = _rope(cfg)
    if arch == "llama" and rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", rope_freqs if rope_freqs is not None else _llama3_rope_factors(cfg))
    if rope.get("rope_type") == "longrope":  # convert_hf_to_gguf.py Phi3MiniModel: the factors as tensors
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    for hf_name, tensor in sorted(_hf_tensors(folder).items()):
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        target = gguf_name(arch, hf_name, n_layers)
        assert target is not None, f"no llama.cpp name for {hf_name} in {arch}"
        data = tensor.astype(np.float32)
        if arch == "llama" and ".attn_q." in target:
            data = _permute(data, heads)
        elif arch == "llama" and ".attn_k." in target:
            data = _permute(data, kv_heads)
        if arch in NORM_PLUS_ONE and target.endswith("norm.weight"):
            data = data + 1.0
        qtype = _tensor_type(target, data.shape, ftype)
        if qtype == "F32":
            w.add_tensor(target, data)
        elif qtype == "F16":
            w.add_tensor(target, data.astype(np.float16))
        else:
            w.add_tensor(target, quantize(data, qtype), raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def dequantized_weights(folder: Path, gguf_path: Path) -> dict[str, np.ndarray]:
    """Every HF weight of `folder`'s model as the GGUF stores it, dequantized by gguf-py, transforms undone."""
    import gguf

    cfg = _config(folder)
    arch = GGUF_ARCH[cfg["model_type"]]
    reader = gguf.GGUFReader(str(gguf_path))
    stored = {t.name: t for t in reader.tensors}
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in _hf_tensors(folder).items():
        target = gguf_name(arch, hf_name, cfg["num_hidden_layers"])
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            target = "token_embd.weight"
        assert target in stored, f"{target} ({hf_name}) is not in {gguf_path.name}"
        t = stored[str(target)]
        data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tensor.shape)
        if arch == "llama" and ".attn_q." in str(target):
            data = _unpermute(data, cfg["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in str(target):
            data = _unpermute(data, cfg["num_key_value_heads"])
        if arch in NORM_PLUS_ONE and str(target).endswith("norm.weight"):
            data = data - 1.0
        out[hf_name] = data
    return out


def dequantized_reference(folder: Path, gguf_path: Path) -> Any:
    """The original model (class, config) carrying the GGUF's dequantized weights: what a faithful
    conversion computes."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    state = {k: torch.from_numpy(v.copy()) for k, v in dequantized_weights(folder, gguf_path).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    model.tie_weights()
    return model.eval()
