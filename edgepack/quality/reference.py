"""The float reference: the HF checkpoint in fp32 torch on the build machine (one decoder layer resident at a time,
checkpoint.float_model), scored once and cached."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.checkpoint import float_model
from edgepack.errors import require
from edgepack.models import ModelSource, model_key
from edgepack.progress import ProgressEvent, ProgressFn, silent
from edgepack.quality import texts
from edgepack.quality.metrics import WindowTopK, reference_window
from edgepack.resources import cache_root

CACHE_VERSION = 2  # 2: keyed by config.json too (the same weights under another config are another model)


@dataclass(frozen=True)
class Reference:
    text_name: str
    text_sha256: str
    ids: list[int]
    prompt_ids: list[int]
    greedy: list[int]
    windows: list[tuple[int, int]]
    scored: list[WindowTopK]
    nll_sum: float
    count: int
    cached: bool


def _cache_path(source: ModelSource, text_sha: str, window: int) -> Path:
    key = f"v{CACHE_VERSION}-{model_key(source)}-{text_sha[:12]}-w{window}-k{texts.TOP_K}"
    return cache_root() / "reference" / f"{key}.npz"


def prompt_ids(tokenizer: Any) -> list[int]:
    """The fixed greedy prompt, in the model's chat format where it has one."""
    msgs = [{"role": "user", "content": texts.GREEDY_PROMPT}]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(i) for i in out]
    return [int(i) for i in tokenizer(texts.GREEDY_PROMPT).input_ids]


def score_reference(source: ModelSource, *, text: texts.EvalText | None = None, window: int = texts.WINDOW,
                    progress: ProgressFn = silent) -> Reference:
    import numpy as np

    text = text or texts.heldout()
    path = _cache_path(source, text.sha256, window)
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        wins = [tuple(w) for w in meta["windows"]]
        cached_scores = [WindowTopK(z[f"t{i}"], z[f"n{i}"], z[f"k{i}"], z[f"l{i}"]) for i in range(len(wins))]
        return Reference(text.name, text.sha256, meta["ids"], meta["prompt_ids"], meta["greedy"], wins,
                         cached_scores, float(sum(float(s.nll.sum()) for s in cached_scores)),
                         int(sum(len(s.nll) for s in cached_scores)), cached=True)

    torch = require("torch", "onnx", "Scoring the float reference")
    transformers = require("transformers", "onnx", "Scoring the float reference")
    progress(ProgressEvent("validate", "scoring the fp32 reference with torch, one decoder layer in memory at a time "
                                       "(once per model; cached)"))
    tok = transformers.AutoTokenizer.from_pretrained(source.hf_dir)
    model = float_model(source.hf_dir)
    ids = [int(i) for i in tok(text.text).input_ids]
    wins = texts.windows(len(ids), window)
    scored: list[WindowTopK] = []
    with torch.inference_mode():
        for i, (s, e) in enumerate(wins):
            progress(ProgressEvent("validate", "reference", done=i, total=len(wins)))
            logits = model(torch.tensor([ids[s:e]])).logits[0].float().numpy()
            w = reference_window(logits, ids[s:e], texts.TOP_K)
            # Same dtypes as the cache holds, so a cached and a fresh run give identical numbers.
            scored.append(WindowTopK(w.target_ids, w.nll, w.topk_ids.astype(np.int32),
                                     w.topk_logp.astype(np.float32)))
        p_ids = prompt_ids(tok)
        out = model.generate(torch.tensor([p_ids]), attention_mask=torch.ones(1, len(p_ids), dtype=torch.long),
                             max_new_tokens=texts.GREEDY_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        greedy = [int(t) for t in out[0][len(p_ids):]]
    meta = {"ids": ids, "prompt_ids": p_ids, "greedy": greedy, "windows": wins}
    arrays: dict[str, Any] = {"meta": np.array(json.dumps(meta))}
    for i, w in enumerate(scored):
        arrays.update({f"t{i}": w.target_ids, f"n{i}": w.nll, f"k{i}": w.topk_ids.astype(np.int32),
                       f"l{i}": w.topk_logp.astype(np.float32)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")  # unique: parallel builds score the same model
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return Reference(text.name, text.sha256, ids, p_ids, greedy, wins, scored,
                     float(sum(float(s.nll.sum()) for s in scored)), int(sum(len(s.nll) for s in scored)),
                     cached=False)
