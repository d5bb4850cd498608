"""Calibration tokens for edgepack's own quantizers (GPTQ, imatrix, SmoothQuant): chunks of a text of the device's
own domain, or sequences sampled from the model itself (seeded and cached, so a rebuild gives the same bytes): no
dataset has to ship, and the held-out text that the quality gate scores stays unseen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import UserError, require
from edgepack.models import ModelSource, model_key
from edgepack.progress import ProgressEvent, ProgressFn
from edgepack.resources import cache_root
from edgepack.targets import TargetProfile


@dataclass(frozen=True)
class Calibration:
    text: Path | None = None  # a UTF-8 file of the device's domain; None = sampled from the model
    samples: int = 16
    tokens: int = 256
    seed: int = 0
    damp: float = 0.01


def calibration_path(target: TargetProfile) -> Path | None:
    """quantize.calibration_text, relative to the target file's folder."""
    ref = target.quantize.calibration_text
    if not ref:
        return None
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(target.source).parent / path
    if not path.is_file():
        raise UserError(f"quantize.calibration_text {ref} does not exist (looked at {path}).",
                        hint="Give a UTF-8 text file, relative to the target file, or remove the field to "
                             "calibrate on text sampled from the model.", path=str(path),
                        field="quantize.calibration_text")
    return path


def calibration_ids(model: Any, source: ModelSource, cal: Calibration, progress: ProgressFn,
                    exported: Path | None = None) -> Any:
    """[samples, tokens] ids: chunks of the calibration text, or sequences sampled from the model (cached): from
    `exported` (an onnxruntime-genai folder of the model's round-to-nearest int4 export) when given, else from the
    float `model`."""
    import torch

    if cal.text is not None:
        transformers = require("transformers", "onnx", "GPTQ quantization")
        tok = transformers.AutoTokenizer.from_pretrained(str(source.hf_dir))
        ids = tok(cal.text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        n = min(cal.samples, len(ids) // cal.tokens)
        if n < 1:
            raise UserError(f"calibration text {cal.text} has {len(ids)} tokens; calibration needs at least "
                            f"{cal.tokens}.",
                            hint=f"Use a longer text (≈{cal.samples * cal.tokens} tokens is plenty).",
                            path=str(cal.text))
        progress(ProgressEvent("quantize", f"calibration: {n}×{cal.tokens} tokens from {cal.text.name}"))
        return torch.tensor(ids[:n * cal.tokens]).reshape(n, cal.tokens)
    cache = cache_root() / "calibration" / (
        f"{model_key(source)}-s{cal.samples}-t{cal.tokens}-seed{cal.seed}{'-int4' if exported else ''}.pt")
    if cache.is_file():
        return torch.load(cache)
    progress(ProgressEvent("quantize", f"calibration: sampling {cal.samples}×{cal.tokens} tokens from the "
                                       f"{'int4 export' if exported else 'model'} (seed {cal.seed}, cached)"))
    ids = _sample_exported(exported, source, cal) if exported else _sample(model, int(model.config.vocab_size), cal)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(ids, tmp)
    tmp.replace(cache)
    return ids


def _sample_exported(folder: Path, source: ModelSource, cal: Calibration) -> Any:
    """The same sampling (a seeded random first token, then top-50) through the round-to-nearest int4 export in
    onnxruntime-genai, every sequence decoded in one batch on the int4 kernels: TinyLlama-1.1B's shape 77 s, where
    the float model read one decoder layer at a time for every token took ~230 s (docs/targets.md)."""
    import json

    import numpy as np
    import torch

    og = require("onnxruntime_genai", "onnx", "Calibration sampling")
    vocab = int(json.loads((source.hf_dir / "config.json").read_text())["vocab_size"])
    first = torch.randint(0, vocab, (cal.samples, 1), generator=torch.Generator().manual_seed(cal.seed))
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=True, top_k=50, temperature=1.0, max_length=cal.tokens,
                              min_length=cal.tokens, random_seed=cal.seed, batch_size=cal.samples)
    generator = og.Generator(model, params)
    generator.append_tokens(first.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    ids = torch.tensor(np.array([generator.get_sequence(i)[:cal.tokens] for i in range(cal.samples)]))
    del generator, params, model  # before the float model and the graph are read
    return ids.long()


def _sample(model: Any, vocab_size: int, cal: Calibration) -> Any:
    """A random first token, then top-50 sampling from the model (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(cal.seed)
    first = torch.randint(0, vocab_size, (cal.samples, 1), generator=gen)
    torch.manual_seed(cal.seed)
    with torch.no_grad():
        out = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, top_k=50,
                             temperature=1.0, max_new_tokens=cal.tokens - 1, min_new_tokens=cal.tokens - 1,
                             pad_token_id=0)
    return out[:, :cal.tokens]
