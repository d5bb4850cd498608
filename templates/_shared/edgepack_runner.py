"""The runner core every edgepack bundle ships (copied as is, not a template): peak RSS, sampling and the context
bound, which everything else builds on. Its siblings: edgepack_cli.py (the command line run.py hands over to),
edgepack_server.py (the OpenAI-compatible HTTP server) and smoke_test.py (the on-device checks and their result
JSON). Each runtime's run.py supplies only a Runtime:

    load(threads)                                    the model, once
    prepare(messages, text) -> (prepared, n)         a chat (with the model's template) or raw text, and its tokens
    generate(prepared, n, max_new, sampling, on_text[, adapter]) -> dict   tokens, each piece of text to on_text
    adapter_names() -> [name]                        runtime LoRA adapters (optional; generate/logits take adapter=)
    from_ids(ids) -> prepared                        recorded token ids as a raw prompt (the smoke test)
    logits(ids) -> array[len(ids), vocab]            teacher-forced logits, where the runtime exposes them, or
    score(ids) -> [log p(ids[i] | ids[:i]) for i >= 1]   where it exposes only scoring (LiteRT-LM)

Standard library only; Python 3.8+.

    python3 run.py --prompt "Write a haiku about the sea."     # streamed text (--json: one JSON document)
    python3 run.py --serve 127.0.0.1:8089                      # OpenAI-compatible API (docs/serve.md)
    python3 run.py --serve unix:/run/user/1000/edgepack.sock   # the same on a unix socket
"""
from __future__ import annotations

import resource
from typing import Any, Dict, List, Optional

QUEUE = 8  # requests waiting for the model beyond the one generating; more get 429 + Retry-After


class ContextError(ValueError):
    """The prompt alone fills the bundle's context."""


def peak_rss_mb() -> float:
    # VmHWM is this process's own peak; ru_maxrss would also count the parent's pages at fork time.
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def fit_context(context_length: int, n_prompt: Optional[int], max_new: int) -> int:
    """New tokens that fit after the prompt; a prompt that leaves no room is refused, never truncated."""
    if max_new < 1:
        raise ValueError("max_tokens must be at least 1 (got %d)" % max_new)
    if context_length and n_prompt is not None:
        if n_prompt >= context_length:
            raise ContextError("the prompt is %d tokens; this bundle's context holds %d (prompt + reply). Shorten the "
                               "prompt or build with a longer runtime.context_length." % (n_prompt, context_length))
        return min(max_new, context_length - n_prompt)
    return max_new


def sampling_of(args: Any) -> Dict[str, Any]:
    return {"sample": args.sample, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "seed": args.seed}


GREEDY = {"sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 1, "seed": None}


def pick_token(logits: Any, sampling: Dict[str, Any], rng: Any) -> int:
    """One position's next token from its logits (numpy), for runtimes that hand back logits: greedy, or sampling
    with temperature, then top-k, then top-p (nucleus). `rng` is numpy's Generator (seeded by the request)."""
    if not sampling["sample"]:
        return int(logits.argmax())
    import numpy as np

    z = logits.astype(np.float64) / max(float(sampling["temperature"]), 1e-5)
    k = int(sampling.get("top_k") or 0)
    idx = np.argpartition(-z, k - 1)[:k] if 0 < k < z.shape[-1] else np.arange(z.shape[-1])
    p = np.exp(z[idx] - z[idx].max())
    order = np.argsort(-p)
    p, idx = p[order] / p.sum(), idx[order]
    keep = int(np.searchsorted(np.cumsum(p), float(sampling["top_p"]))) + 1
    p, idx = p[:keep] / p[:keep].sum(), idx[:keep]
    return int(idx[rng.choice(len(p), p=p)])


def adapter_names(rt: Any) -> List[str]:
    """The runtime LoRA adapters a bundle's Runtime carries (only ONNX bundles built with --runtime-adapter)."""
    names = getattr(rt, "adapter_names", None)
    return list(names()) if names else []


def chat_messages(prompt: str, system: Optional[str]) -> List[Dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
