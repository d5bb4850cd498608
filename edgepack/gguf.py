"""GGUF files → a plain Hugging Face checkpoint, with the tokenizer checked against the GGUF's own metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgepack.errors import ModelError, require
from edgepack.fsutil import staging_dir
from edgepack.models import TokenizerFacts
from edgepack.progress import ProgressEvent, ProgressFn, silent

GGUF_MAGIC = b"GGUF"
# llama.cpp pre-tokenizer name → the longest run of digits one token may hold (None: not checked).
DIGIT_RUN = {"smollm": 1, "qwen2": 1, "deepseek-llm": 1, "llama-bpe": 3, "llama3": 3, "dbrx": 3}


def check_gguf_header(path: Path) -> None:
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic).",
                         hint="Pass a .gguf file written by llama.cpp, or a Hugging Face model folder.",
                         path=path)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    if len(f.data) == 1:
        part = f.parts[f.data[0]]
        if part.dtype.kind in "u" and part.dtype.itemsize == 1 and len(part) > 1:  # a string
            return bytes(part).decode("utf-8", "replace")
        value = part.tolist()
        return value[0] if isinstance(value, list) and len(value) == 1 else value
    return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]


def read_gguf_meta(path: Path) -> dict[str, Any]:
    gguf = require("gguf", "onnx", "Reading GGUF files")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # truncated files raise ValueError/IndexError/struct errors from numpy memmap
        raise ModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it may be truncated.",
                         hint="Download it again and compare its sha256.", path=path) from exc
    meta = {k: _field(reader, k) for k in (
        "general.architecture", "general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token")}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    meta["tokens"] = [bytes(tokens.parts[i]).decode("utf-8", "replace") for i in tokens.data] if tokens else []
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
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelError(f"transformers cannot load {path.name}: {exc}",
                         hint="Only GGUF architectures transformers can dequantize are supported "
                              "(llama, mistral, qwen2, phi3, ...).", path=path) from exc
    facts = check_tokenizer(tok, meta)
    # A model loaded from GGUF refuses save_pretrained: move its weights into a plain model of the same class.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    if facts.eos_token_id is not None:
        plain.generation_config.eos_token_id = facts.eos_token_id
        plain.config.eos_token_id = facts.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(target, force=True) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        (tmp / "edgepack-source.json").write_text(json.dumps({
            "gguf": str(path), "meta": {k: v for k, v in meta.items() if k != "tokens"},
            "tokenizer": {"eos_token_id": facts.eos_token_id, "bos_token_id": facts.bos_token_id,
                          "add_bos_token": facts.add_bos_token, "checked_against": facts.checked_against,
                          "fixes": list(facts.fixes)}}, indent=2), encoding="utf-8")
    del plain, model
    return facts


def check_tokenizer(tok: Any, meta: dict[str, Any]) -> TokenizerFacts:
    """Compare transformers' converted tokenizer with the GGUF metadata; fix eos, refuse what cannot be fixed."""
    fixes: list[str] = []
    tokens: list[str] = meta["tokens"]
    eos, bos = meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.bos_token_id")
    if eos is not None and tok.eos_token_id != eos:
        fixes.append(f"eos_token_id {tok.eos_token_id} -> {eos} ({tokens[eos]!r}, from GGUF metadata)")
        tok.eos_token = tokens[eos]
    if len(tok) < len(tokens):
        raise ModelError(f"converted tokenizer has {len(tok)} tokens but the GGUF lists {len(tokens)}.",
                         hint="This GGUF's tokenizer is not supported; use the original HF folder instead.")
    vocab_mismatch = [i for i in range(0, len(tokens), max(1, len(tokens) // 512))
                      if tok.convert_ids_to_tokens(i) != tokens[i]]
    if vocab_mismatch:
        i = vocab_mismatch[0]
        raise ModelError(f"converted tokenizer disagrees with the GGUF vocabulary at id {i}: "
                         f"{tok.convert_ids_to_tokens(i)!r} vs {tokens[i]!r}.",
                         hint="Use the original HF folder for this model instead of the GGUF.")
    want_bos = meta.get("tokenizer.ggml.add_bos_token")
    ids = tok("Hello").input_ids
    has_bos = bool(ids) and bos is not None and ids[0] == bos
    if want_bos is not None and bool(want_bos) != has_bos:
        raise ModelError(f"converted tokenizer {'adds' if has_bos else 'does not add'} BOS but the GGUF says "
                         f"add_bos_token={bool(want_bos)}.",
                         hint="Use the original HF folder for this model instead of the GGUF.")
    pre = meta.get("tokenizer.ggml.pre")
    run = DIGIT_RUN.get(str(pre))
    if run is not None:
        pieces = tok.convert_ids_to_tokens(tok("1234567", add_special_tokens=False).input_ids)
        longest = max((sum(c.isdigit() for c in p) for p in pieces), default=0)
        if longest > run:
            raise ModelError(f"converted tokenizer groups {longest} digits per token; the GGUF's '{pre}' "
                             f"pre-tokenizer splits digits into runs of at most {run}.",
                             hint="Use the original HF folder for this model instead of the GGUF.")
    return TokenizerFacts(eos_token_id=tok.eos_token_id, bos_token_id=bos, add_bos_token=has_bos,
                          checked_against=f"gguf metadata (pre={pre})", fixes=tuple(fixes))


def remove_cached(target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
