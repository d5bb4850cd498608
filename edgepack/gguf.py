"""GGUF files → a plain Hugging Face checkpoint, with the tokenizer checked against the GGUF's own metadata."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.errors import ModelError, require
from edgepack.fsutil import cache_entry
from edgepack.llama_spm import USER_DEFINED, spm_encode
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.source import TokenizerFacts

GGUF_MAGIC = b"GGUF"
# llama.cpp pre-tokenizer name → the longest run of digits one token may hold (None: not checked).
DIGIT_RUN = {"smollm": 1, "qwen2": 1, "deepseek-llm": 1, "llama-bpe": 3, "llama3": 3, "dbrx": 3}
# Tensors in which llama.cpp's converters store rope scaling that has no metadata key.
ROPE_TENSORS = {"rope_freqs.weight": "rope_freqs", "rope_factors_long.weight": "rope_factors_long",
                "rope_factors_short.weight": "rope_factors_short"}
# llama.cpp scales Gemma 2/3 queries by 1/sqrt(head_dim), except in the 27B models (this many layers), which
# use 1/sqrt(hidden/heads) (llama-model.cpp, f_attention_scale); the GGUF carries no key for it.
WIDE_QUERY_SCALE_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's fixed rope base for Gemma 3's sliding-window layers when the file has no rope.freq_base_swa.
SWA_ROPE_BASE = {"gemma3": 10000.0}
# llama3 rope parameters (low, high, original context) to try; the file keeps only the factors they produce.
LLAMA3_ROPE_CANDIDATES = [(low, high, ctx) for ctx in (8192, 4096, 2048, 16384, 32768, 65536, 131072)
                          for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0))]
# Probe texts for the tokenizer checks: leading and doubled spaces, newline, tab, digits, accents, an emoji
# and a symbol small vocabularies lack (byte fallback), plain words.
PROBES = ("Hello world", " leading space", "two  spaces and\nnew line\ttab", "naïve café – 😀 ∑",
          "1234567 and 3.14")
TOKENIZER_HINT = "Use the original Hugging Face folder for this model instead of the GGUF."
# tokenizer.ggml.token_type of a plain piece (llama.cpp's llama_token_type; gguf-py's TokenType).
NORMAL = 1


def check_gguf_header(path: Path) -> None:
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic).",
                         hint="Pass a .gguf file written by llama.cpp, or a Hugging Face model folder.",
                         path=path)


def _value(field: Any) -> Any:
    """A metadata field as Python data (a scalar, a string, or a list of either)."""
    try:
        return field.contents()
    except UnicodeDecodeError:  # a vocabulary with invalid UTF-8 pieces: keep what can be read
        return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]


def read_gguf_meta(path: Path) -> dict[str, Any]:
    """The metadata edgepack checks: general.*, tokenizer.ggml.*, the architecture's own keys, the token
    arrays (tokens, scores, token_type) and the rope-factor tensors llama.cpp stores instead of keys."""
    gguf = require("gguf", "onnx", "Reading GGUF files")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # truncated files raise ValueError/IndexError/struct errors from numpy memmap
        raise ModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it may be truncated.",
                         hint="Download it again and compare its sha256.", path=path) from exc
    arch = reader.fields.get("general.architecture")
    prefix = f"{_value(arch)}." if arch is not None else "general."
    arrays = {"tokenizer.ggml.tokens": "tokens", "tokenizer.ggml.scores": "scores",
              "tokenizer.ggml.token_type": "token_type"}
    meta: dict[str, Any] = {"tokens": [], "scores": None, "token_type": None}
    for key, field in reader.fields.items():
        if key in arrays:
            meta[arrays[key]] = _value(field)
        elif key.startswith(("general.", prefix, "tokenizer.ggml.")) and key != "tokenizer.ggml.merges":
            meta[key] = _value(field)
    for tensor in reader.tensors:
        if tensor.name in ROPE_TENSORS:
            meta[ROPE_TENSORS[tensor.name]] = [float(x) for x in gguf.quants.dequantize(tensor.data,
                                                                                         tensor.tensor_type)]
    return meta


def convert_gguf(path: Path, target: Path, *, progress: ProgressFn = silent) -> TokenizerFacts:
    """Write a plain HF checkpoint for `path` into `target` once; later calls read the cached facts."""
    facts_file = target / "edgepack-source.json"
    if facts_file.is_file():
        data = json.loads(facts_file.read_text(encoding="utf-8"))["tokenizer"]
        return TokenizerFacts(**{**data, "fixes": tuple(data.get("fixes", ()))})
    meta = read_gguf_meta(path)
    transformers = require("transformers", "onnx", "Converting GGUF files")
    require("accelerate", "onnx", "Converting GGUF files")
    progress(ProgressEvent("resolve", f"converting {path.name} to a Hugging Face checkpoint (once; cached)"))
    try:
        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelError(f"transformers cannot load {path.name}: {exc}",
                         hint="Only GGUF architectures transformers can dequantize are supported "
                              "(llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3, ...).", path=path) from exc
    # transformers reads only part of the metadata into the config; what it drops is restored before the
    # weights are laid out, so shapes (head_dim) and numerics (rope, attention scale) follow the file.
    config_fixes = fix_config(config, meta)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config)
    facts = check_tokenizer(tok, meta)
    for fix in config_fixes:
        progress(ProgressEvent("resolve", f"fixed from GGUF metadata: {fix}"))
    # A model loaded from GGUF refuses save_pretrained: move its weights into a plain model of the same class.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    stops = stop_token_ids(meta, facts.eos_token_id)
    if stops:
        plain.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        plain.config.eos_token_id = facts.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_entry(target) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _drop_tokens_past(tmp, len(meta["tokens"]))
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        (tmp / "edgepack-source.json").write_text(json.dumps({
            "gguf": str(path), "meta": {k: v for k, v in meta.items() if not isinstance(v, list)},
            "config_fixes": config_fixes, "stop_token_ids": stops,
            "tokenizer": {"eos_token_id": facts.eos_token_id, "bos_token_id": facts.bos_token_id,
                          "add_bos_token": facts.add_bos_token, "checked_against": facts.checked_against,
                          "fixes": list(facts.fixes)}}, indent=2), encoding="utf-8")
    del plain, model
    return facts


# ---- the config: what transformers' GGUF reader leaves out -------------------------------------------------

def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(f"{float(value):.7g}")


def _rope_holder(config: Any) -> dict[str, Any]:
    """The rope parameters of full-attention layers (Gemma 3 keeps one dict per layer type)."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict):
        rope = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
        config.rope_parameters = rope
    full = rope.get("full_attention")
    return full if isinstance(full, dict) else rope


def _fix_head_dim(config: Any, arch: str, meta: dict[str, Any]) -> list[str]:
    want = meta.get(f"{arch}.attention.key_length")
    have = getattr(config, "head_dim", None)
    if want is None or have is None or have == want:
        return []
    config.head_dim = int(want)
    return [f"head_dim {have} -> {want} (attention.key_length)"]


def _fix_query_scale(config: Any, arch: str, meta: dict[str, Any]) -> list[str]:
    if not hasattr(config, "query_pre_attn_scalar"):
        return []
    scale = meta.get(f"{arch}.attention.scale")
    if scale:
        want: float = round(1.0 / float(scale) ** 2, 4)
        why = "attention.scale"
    elif meta.get(f"{arch}.block_count") == WIDE_QUERY_SCALE_LAYERS.get(arch):
        want, why = config.hidden_size // config.num_attention_heads, "hidden/heads, as llama.cpp does for 27B"
    else:
        want, why = config.head_dim, "head_dim, as llama.cpp does"
    have = config.query_pre_attn_scalar
    if have == want:
        return []
    config.query_pre_attn_scalar = int(want) if float(want).is_integer() else want
    return [f"query_pre_attn_scalar {have} -> {config.query_pre_attn_scalar} ({why})"]


def _fix_softcapping(config: Any, arch: str, meta: dict[str, Any]) -> list[str]:
    fixes = []
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = meta.get(f"{arch}.{name}")
        if value is None or not hasattr(config, name) or getattr(config, name) == _f32(value):
            continue
        fixes.append(f"{name} {getattr(config, name)} -> {_f32(value)}")
        setattr(config, name, _f32(value))
    return fixes


def _llama3_factors(base: float, dim: int, factor: float, low: float, high: float, ctx: int) -> list[float]:
    # convert_hf_to_gguf.py's llama3 rope_freqs, which is transformers' llama3 rope written per frequency
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _fix_rope_tensors(config: Any, arch: str, meta: dict[str, Any]) -> list[str]:
    rope = _rope_holder(config)
    base = float(rope.get("rope_theta", 10000.0))
    if meta.get("rope_freqs") and rope.get("rope_type") != "llama3":
        factors = meta["rope_freqs"]
        dim, factor = 2 * len(factors), max(factors)
        for low, high, ctx in LLAMA3_ROPE_CANDIDATES:
            guess = _llama3_factors(base, dim, factor, low, high, ctx)
            if all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(guess, factors, strict=True)):
                rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                            original_max_position_embeddings=ctx)
                return [f"rope llama3 (factor {factor}, low {low}, high {high}, original context {ctx}) "
                        "recovered from the rope_freqs tensor"]
        raise ModelError("this GGUF scales rope with a rope_freqs tensor that matches no llama3 rope scaling "
                         "edgepack knows; converting it would silently change the model.", hint=TOKENIZER_HINT)
    if meta.get("rope_factors_long") and rope.get("rope_type") != "longrope":
        ctx = meta.get(f"{arch}.rope.scaling.original_context_length") or config.max_position_embeddings
        rope.update(rope_type="longrope", long_factor=meta["rope_factors_long"],
                    short_factor=meta.get("rope_factors_short") or meta["rope_factors_long"],
                    original_max_position_embeddings=int(ctx))
        if meta.get(f"{arch}.rope.scaling.attn_factor"):
            rope["attention_factor"] = _f32(meta[f"{arch}.rope.scaling.attn_factor"])
        if hasattr(config, "original_max_position_embeddings"):
            config.original_max_position_embeddings = int(ctx)
        return [f"rope longrope ({len(meta['rope_factors_long'])} factors, original context {ctx}) "
                "recovered from the rope_factors tensors"]
    return []


def _fix_rope_scaling(config: Any, arch: str, meta: dict[str, Any]) -> list[str]:
    kind = meta.get(f"{arch}.rope.scaling.type")
    rope = _rope_holder(config)
    if kind in (None, "none") or rope.get("rope_type") not in ("default", None):
        return []
    if kind != "linear":
        raise ModelError(f"this GGUF uses '{kind}' rope scaling, which transformers drops when it reads the file.",
                         hint=TOKENIZER_HINT)
    factor = _f32(meta.get(f"{arch}.rope.scaling.factor") or 1.0)
    rope.update(rope_type="linear", factor=factor)
    return [f"rope linear scaling factor {factor} (rope.scaling.*)"]


def _fix_swa_rope_base(config: Any, arch: str, meta: dict[str, Any]) -> list[str]:
    rope = getattr(config, "rope_parameters", None)
    local = rope.get("sliding_attention") if isinstance(rope, dict) else None
    want = meta.get(f"{arch}.rope.freq_base_swa") or SWA_ROPE_BASE.get(arch)
    if not isinstance(local, dict) or want is None or local.get("rope_theta") == _f32(want):
        return []
    have, local["rope_theta"] = local.get("rope_theta"), _f32(want)
    return [f"sliding-window rope base {have} -> {local['rope_theta']}"]


CONFIG_FIXES: tuple[Callable[[Any, str, dict[str, Any]], list[str]], ...] = (
    _fix_head_dim, _fix_query_scale, _fix_softcapping, _fix_rope_tensors, _fix_rope_scaling, _fix_swa_rope_base)


def fix_config(config: Any, meta: dict[str, Any]) -> list[str]:
    """Put into `config` what the GGUF states (or llama.cpp implies) and transformers' reader dropped."""
    arch = str(meta.get("general.architecture"))
    return [fix for rule in CONFIG_FIXES for fix in rule(config, arch, meta)]


def stop_token_ids(meta: dict[str, Any], eos: int | None) -> list[int]:
    """Every id llama.cpp ends generation on: eos, then end-of-turn and end-of-message when the file has them."""
    ids = [eos, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None and i >= 0))


# ---- the tokenizer ---------------------------------------------------------------------------------------------

def _spelled(token: str) -> str:
    # Gemma files keep user-defined pieces made only of spaces as real spaces ("  ", llama.cpp's converter
    # "pre-normalizes" them); transformers and SentencePiece spell them as "▁" runs.
    return "▁" * len(token) if token and not token.strip(" ") else token


def _probes(meta: dict[str, Any]) -> tuple[str, ...]:
    """PROBES, plus, for a vocabulary with user-defined tokens, one text holding them between letters and a run
    of 40 spaces (longer than Gemma's longest space token, so it is cut in two)."""
    tokens, types = meta["tokens"], meta.get("token_type") or ()
    user = [tokens[i] for i, t in enumerate(types) if t == USER_DEFINED and tokens[i]][:64]
    return (*PROBES, "a" + "b".join(user) + "c" + " " * 40 + "d") if user else PROBES


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


def _fix_spm_pipeline(tok: Any, meta: dict[str, Any]) -> list[str]:
    """Make a SentencePiece vocabulary split text the way llama.cpp does: one "▁" prepended when
    add_space_prefix (default true), every space as "▁", no pre-splitting, byte fallback on, merges in score
    order, user-defined whitespace tokens matched whole."""
    from tokenizers import decoders, normalizers

    backend = tok.backend_tokenizer
    before = [_encode(tok, p) for p in PROBES]
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    fixes = _merges_by_score(tok, meta) + _whole_space_tokens(tok, meta)
    if 6 in (meta.get("token_type") or ()) and hasattr(backend.model, "byte_fallback") \
            and not backend.model.byte_fallback:
        backend.model.byte_fallback = True
        fixes.append("byte fallback on (the GGUF vocabulary has <0xNN> byte tokens)")
    changed = [p for p, ids in zip(PROBES, before, strict=True) if _encode(tok, p) != ids]
    if changed:
        fixes.append(f"SentencePiece spaces as llama.cpp splits them (add_space_prefix={prefix}); "
                     f"changed: {changed!r}")
    return fixes


def _merges_by_score(tok: Any, meta: dict[str, Any]) -> list[str]:
    """Rebuild the BPE merges from the file's scores: SentencePiece (bpe_model.cc) and llama.cpp both merge the
    pair whose result scores highest, among normal pieces only. transformers orders Gemma's merges by token
    position instead, which agrees only where the scores fall with the ids."""
    import tokenizers
    from transformers.tokenization_utils_base import generate_merges

    model, scores, types = tok.backend_tokenizer.model, meta.get("scores"), meta.get("token_type")
    if not isinstance(model, tokenizers.models.BPE) or not scores or not types or len(set(scores)) < 2:
        return []
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    normal = {t: float(scores[i]) for t, i in vocab.items() if i < len(types) and types[i] == NORMAL}
    merges = generate_merges(vocab, normal, skip_tokens=[t for t in vocab if t not in normal])
    before = [_encode(tok, p) for p in _probes(meta)]
    tok.backend_tokenizer.model = tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token=model.unk_token,
                                                        byte_fallback=model.byte_fallback, fuse_unk=model.fuse_unk)
    if before == [_encode(tok, p) for p in _probes(meta)]:
        return []
    return [f"merges rebuilt in score order ({len(merges)}, from tokenizer.ggml.scores), as SentencePiece merges"]


def _whole_space_tokens(tok: Any, meta: dict[str, Any]) -> list[str]:
    """Gemma's runs of 2-31 spaces are user-defined pieces: SentencePiece matches them whole before merging
    (longest match, never merged further) and llama.cpp cuts them out of the text first, so a run of 40 spaces
    is 31 + 9. transformers leaves them to the merges (40 spaces: 16 + 24); make them whole tokens, matched
    after spaces became "▁"."""
    from tokenizers import AddedToken

    tokens, types = meta["tokens"], meta.get("token_type") or ()
    model = tok.backend_tokenizer.model
    runs = [AddedToken("▁" * len(tokens[i]), normalized=True, special=False)
            for i, t in enumerate(types) if t == USER_DEFINED and tokens[i] and not tokens[i].strip(" ")
            and model.token_to_id("▁" * len(tokens[i])) == i]
    if not runs:
        return []
    tok.add_tokens(runs)
    return [f"{len(runs)} user-defined whitespace tokens matched whole, as SentencePiece and llama.cpp do"]


def check_tokenizer(tok: Any, meta: dict[str, Any]) -> TokenizerFacts:
    """Compare transformers' converted tokenizer with the GGUF metadata; fix what the metadata settles,
    refuse what it cannot."""
    fixes: list[str] = []
    tokens: list[str] = meta["tokens"]
    sentencepiece = meta.get("tokenizer.ggml.model") == "llama"
    eos, bos = meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.bos_token_id")
    if eos is not None and tok.eos_token_id != eos:
        fixes.append(f"eos_token_id {tok.eos_token_id} -> {eos} ({tokens[eos]!r}, from GGUF metadata)")
        tok.eos_token = tokens[eos]
    if len(tok) < len(tokens):
        raise ModelError(f"converted tokenizer has {len(tok)} tokens but the GGUF lists {len(tokens)}.",
                         hint="This GGUF's tokenizer is not supported; use the original HF folder instead.")
    if len(tok) > len(tokens):
        extra = tok.convert_ids_to_tokens(list(range(len(tokens), len(tok))))
        fixes.append(f"dropped {extra!r}: transformers added them past the GGUF's {len(tokens)} tokens")
    vocab_mismatch = [i for i in range(0, len(tokens), max(1, len(tokens) // 512))
                      if _spelled(tok.convert_ids_to_tokens(i)) != _spelled(tokens[i])]
    if vocab_mismatch:
        i = vocab_mismatch[0]
        raise ModelError(f"converted tokenizer disagrees with the GGUF vocabulary at id {i}: "
                         f"{tok.convert_ids_to_tokens(i)!r} vs {tokens[i]!r}.", hint=TOKENIZER_HINT)
    types = meta.get("token_type") or ()
    control = [i for i, t in enumerate(types) if t == 3 and i not in (bos, eos)][:64]
    split = [tokens[i] for i in control if _encode(tok, tokens[i]) != [i]]
    if split:
        raise ModelError(f"converted tokenizer cuts the GGUF's control tokens {split[:5]!r} into pieces.",
                         hint=TOKENIZER_HINT)
    if sentencepiece:
        fixes += _fix_spm_pipeline(tok, meta)
        for probe in _probes(meta):
            got, want = _encode(tok, probe), spm_encode(probe, meta)
            if got != want:
                raise ModelError(f"converted tokenizer splits {probe!r} as {tok.convert_ids_to_tokens(got)} "
                                 f"where llama.cpp would use {[tokens[i] for i in want]}.", hint=TOKENIZER_HINT)
    want_bos = meta.get("tokenizer.ggml.add_bos_token", True if sentencepiece else None)
    has_bos = _adds_bos(tok, bos)
    # Refused rather than flipped: tests/integration/test_model_sources.py pins that contract (setting
    # tok.add_bos_token would rebuild the post-processor and fix it).
    if want_bos is not None and bool(want_bos) != has_bos:
        raise ModelError(f"converted tokenizer {'adds' if has_bos else 'does not add'} BOS but the GGUF says "
                         f"add_bos_token={bool(want_bos)}.", hint=TOKENIZER_HINT)
    pre = meta.get("tokenizer.ggml.pre")
    run = DIGIT_RUN.get(str(pre))
    if run is not None:
        pieces = tok.convert_ids_to_tokens(tok("1234567", add_special_tokens=False).input_ids)
        longest = max((sum(c.isdigit() for c in p) for p in pieces), default=0)
        if longest > run:
            raise ModelError(f"converted tokenizer groups {longest} digits per token; the GGUF's '{pre}' "
                             f"pre-tokenizer splits digits into runs of at most {run}.", hint=TOKENIZER_HINT)
    return TokenizerFacts(eos_token_id=tok.eos_token_id, bos_token_id=bos, add_bos_token=has_bos,
                          checked_against=f"gguf metadata (model={meta.get('tokenizer.ggml.model')}, pre={pre})",
                          fixes=tuple(fixes))


def _adds_bos(tok: Any, bos: int | None) -> bool:
    ids = tok("Hello").input_ids
    return bool(ids) and bos is not None and ids[0] == bos


def _drop_tokens_past(folder: Path, n_vocab: int) -> None:
    """Remove added tokens whose ids lie past the model's vocabulary from a saved tokenizer (GemmaTokenizer
    adds <mask> when the file has none): an id the embedding has no row for must never be produced."""
    tok_file, cfg_file = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tok_file.is_file():
        return
    data = json.loads(tok_file.read_text(encoding="utf-8"))
    dropped = {a["content"] for a in data.get("added_tokens", []) if a["id"] >= n_vocab}
    if not dropped:
        return
    data["added_tokens"] = [a for a in data["added_tokens"] if a["id"] < n_vocab]
    tok_file.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        for key, value in list(cfg.items()):
            if isinstance(value, str) and value in dropped:
                cfg[key] = None
            elif isinstance(value, list):
                cfg[key] = [v for v in value if v not in dropped]
            elif key == "added_tokens_decoder" and isinstance(value, dict):
                cfg[key] = {k: v for k, v in value.items() if int(k) < n_vocab}
        cfg_file.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def remove_cached(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
