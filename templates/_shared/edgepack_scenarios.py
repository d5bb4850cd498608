"""The bench scenarios every bundle's runner can play (`run.py --scenario chat|extraction --json`; the runner core,
copied as is): what a chat on the device feels like with each speed feature on and off, in one process.

  chat         a system prompt and 10 turns (fewer where the context ends) of ~40-token questions with 24-token
               greedy replies, the history growing: time to first token (TTFT) per turn without a prompt cache,
               with it (the reply settled in the idle time between turns, timed apart), and with it and n-gram
               speculative decoding.
  extraction   a reply that copies the prompt (fields out of an invoice): decode tok/s with speculative decoding
               off and "ngram", alternated `reps` times.

Arms a runtime does not have (LiteRT: no speculative decoding; LiteRT-LM: no prompt cache either) are left out and
listed under `unsupported`. Every arm is greedy: `same_tokens` says, arm by arm, whether its tokens equal the plain
arm's.

Standard library only; Python 3.8+.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List

from edgepack_runner import GREEDY, chat_messages

SYSTEM = "You are a concise assistant on a small device. Answer in one or two sentences."
TOPICS = ("depth", "colour", "salt", "heat", "life", "waves", "tides", "ice", "light", "sound")
QUESTION = ("Tell me about the %s of the ocean: why does it matter for the climate of the whole planet and for the "
            "people who live along its coasts?")
DOCUMENT = ("Invoice 2024-117. Customer: Ada Lovelace, 12 Analytical Street, London. Items: 3 brass gears at 4.50 "
            "each, 2 packs of punch cards at 1.25 each, 1 steam valve at 19.99. Shipping: express courier, tracking "
            "number ZX-44-918. Payment due on the 30th of June by bank transfer to account 55-1093-22.")
EXTRACT = "Copy the customer's name, address, items and tracking number from this text exactly:\n" + DOCUMENT
REPLY_TOKENS = 24
EXTRACT_TOKENS = 96


def _arms(rt: Any) -> Dict[str, Dict[str, Any]]:
    """Arm name → (prompt cache on?, speculative mode) for what this runtime has."""
    arms: Dict[str, Dict[str, Any]] = {"plain": {"cache": False, "speculative": "off"}}
    if getattr(rt, "cache", None) is not None:
        arms["prompt_cache"] = {"cache": True, "speculative": "off"}
        if "ngram" in getattr(rt, "speculative_modes", ()):
            arms["prompt_cache+ngram"] = {"cache": True, "speculative": "ngram"}
    return arms


def _generate(rt: Any, ids: Any, n: int, max_new: int, speculative: str) -> Dict[str, Any]:
    extra = {"speculative": speculative} if "ngram" in getattr(rt, "speculative_modes", ()) else {}
    return rt.generate(ids, n, max_new, GREEDY, lambda piece: None, **extra)


def _said(out: Dict[str, Any]) -> Any:
    """What a generation produced: its token ids, or its text where a runtime gives no ids (LiteRT-LM)."""
    return out.get("tokens", out.get("text"))


def _unsupported(rt: Any) -> List[str]:
    out = []
    if getattr(rt, "cache", None) is None:
        out.append("prompt_cache")
    if "ngram" not in getattr(rt, "speculative_modes", ()):
        out.append("ngram")
    return out


def chat(rt: Any, turns: int = 10) -> Dict[str, Any]:
    arms = _arms(rt)
    caches = {}
    if "prompt_cache" in arms:
        on = rt.cache
        caches = {name: on.like(len(on.slots) if spec["cache"] else 0) for name, spec in arms.items()}
    history = [{"role": "system", "content": SYSTEM}]
    rows: List[Dict[str, Any]] = []
    same = {name: True for name in arms}
    for name in caches:  # what the server does at load: the system prompt's KV, ready before the first turn
        rt.cache = caches[name]
        if arms[name]["cache"]:
            rt.warm(SYSTEM, arms[name]["speculative"])
    for turn in range(turns):
        history.append({"role": "user", "content": QUESTION % TOPICS[turn % len(TOPICS)]})
        ids, n = rt.prepare(history, None)
        if getattr(rt, "context_length", 0) and n + REPLY_TOKENS > rt.context_length:
            break  # a small context: the turns that fit
        row: Dict[str, Any] = {"turn": turn + 1, "prompt_tokens": n, "ttft_ms": {}, "decode_tokens_per_s": {},
                               "reused_tokens": {}, "settle_ms": {}}
        first = None
        for name, spec in arms.items():
            if caches:
                rt.cache = caches[name]
            out = _generate(rt, ids, n, REPLY_TOKENS, spec["speculative"])
            row["ttft_ms"][name] = out["prefill_ms"]
            row["decode_tokens_per_s"][name] = out["decode_tokens_per_s"]
            row["reused_tokens"][name] = out.get("reused_tokens", 0)
            if spec["cache"]:  # the idle time between turns: the server settles the reply there
                t0 = time.perf_counter()
                while rt.settle():
                    pass
                row["settle_ms"][name] = round((time.perf_counter() - t0) * 1000, 2)
            if first is None:
                first = out
            elif _said(out) != _said(first):
                same[name] = False
        history.append({"role": "assistant", "content": first["text"]})
        rows.append(row)
    if caches:
        rt.cache = caches.get("prompt_cache", rt.cache)
    doc: Dict[str, Any] = {"scenario": "chat", "turns": rows, "turns_played": len(rows), "same_tokens": same,
                           "unsupported": _unsupported(rt)}
    for name in arms:
        key = name.replace("+", "_")
        doc["ttft_ms_turn1_" + key] = rows[0]["ttft_ms"][name]
        doc["ttft_ms_last_" + key] = rows[-1]["ttft_ms"][name]
        doc["ttft_growth_" + key] = round(rows[-1]["ttft_ms"][name] / rows[0]["ttft_ms"][name], 3)
        rates = [r["decode_tokens_per_s"][name] for r in rows if r["decode_tokens_per_s"][name]]
        doc["decode_tokens_per_s_" + key] = round(statistics.median(rates), 2) if rates else None
    doc["decode_tokens_per_s"] = doc["decode_tokens_per_s_plain"]
    return doc


def extraction(rt: Any, reps: int = 3) -> Dict[str, Any]:
    ids, n = rt.prepare(chat_messages(EXTRACT, None), None)
    modes = ["off"] + (["ngram"] if "ngram" in getattr(rt, "speculative_modes", ()) else [])
    rates: Dict[str, List[float]] = {m: [] for m in modes}
    tokens: Dict[str, Any] = {}
    new_tokens = 0
    cache = getattr(rt, "cache", None)
    if cache is not None:  # every run prefills the prompt: decode speed alone is compared
        rt.cache = cache.like(0)
    try:
        for _ in range(reps):
            for mode in modes:
                out = _generate(rt, ids, n, EXTRACT_TOKENS, mode)
                rates[mode].append(out["decode_tokens_per_s"] or 0.0)
                tokens.setdefault(mode, _said(out))
                new_tokens = out["new_tokens"]
    finally:
        if cache is not None:
            rt.cache = cache
    doc: Dict[str, Any] = {"scenario": "extraction", "prompt_tokens": n, "new_tokens": new_tokens,
                           "reps": reps, "unsupported": _unsupported(rt),
                           "same_tokens": {m: t == tokens["off"] for m, t in tokens.items()},
                           "runs_tokens_per_s": rates}
    doc["decode_tokens_per_s"] = round(statistics.median(rates["off"]), 2)
    if "ngram" in rates:
        doc["decode_tokens_per_s_ngram"] = round(statistics.median(rates["ngram"]), 2)
        doc["ngram_speedup"] = round(doc["decode_tokens_per_s_ngram"] / doc["decode_tokens_per_s"], 3)
    return doc


SCENARIOS = {"chat": chat, "extraction": extraction}
