"""The runner core every edgepack bundle ships (copied as is, not a template): peak RSS, sampling and the context
bound, the prompt cache's bookkeeping, which everything else builds on. Its siblings: edgepack_cli.py (the command
line run.py hands over to), edgepack_server.py (the OpenAI-compatible HTTP server), edgepack_scenarios.py (the bench
scenarios) and smoke_test.py (the on-device checks and their result JSON). Each runtime's run.py supplies only a
Runtime:

    load(threads)                                    the model, once
    prepare(messages, text) -> (prepared, n)         a chat (with the model's template) or raw text, and its tokens
    generate(prepared, n, max_new, sampling, on_text[, adapter]) -> dict   tokens, each piece of text to on_text
    adapter_names() -> [name]                        runtime LoRA adapters (optional; generate/logits take adapter=)
    from_ids(ids) -> prepared                        recorded token ids as a raw prompt (the smoke test)
    logits(ids) -> array[len(ids), vocab]            teacher-forced logits, where the runtime exposes them, or
    score(ids) -> [log p(ids[i] | ids[:i]) for i >= 1]   where it exposes only scoring (LiteRT-LM)
    cache, warm(system), settle() -> more?           a runtime that can rewind its K/V (the prompt cache, below)
    speculative_modes, generate(..., speculative=)   speculative decoding (onnxruntime-genai: "off", "ngram")

Standard library only; Python 3.8+.

    python3 run.py --prompt "Write a haiku about the sea."     # streamed text (--json: one JSON document)
    python3 run.py --serve 127.0.0.1:8089                      # OpenAI-compatible API (docs/serve.md)
    python3 run.py --serve unix:/run/user/1000/edgepack.sock   # the same on a unix socket
"""
from __future__ import annotations

import resource
from typing import Any, Dict, List, Optional, Tuple

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


# -- prompt cache: KV states kept between requests ------------------------------------------------------------
#
# A chat sends its whole history every turn. A slot keeps one conversation's KV state after its request, and the
# next request that starts with the same tokens appends only what is new. Only KV computed by a prefill is reused
# (`exact`): a decode step computes a token's K/V through other kernels (one row), and reusing those would change
# later logits in the last bits, so greedy output would differ from a full prefill. The reply's tokens are
# therefore `pending` after the request, and `settle` prefills them (in chunks, while the server is idle): then
# the whole turn is exact, and a prefill in two chunks equals one prefill bit for bit (tests check both).

SETTLE_CHUNK = 16  # tokens prefilled per idle step: a waiting request waits at most one chunk
# A slot's KV is allocated (and zeroed) at its full size: it starts at SLOT_PAGE tokens and doubles, up to the
# slot's length. A conversation that leaves less than `reserve` tokens free (the next question and reply) is moved
# to a larger allocation while the server is idle: the old KV is freed first, then its tokens are prefilled again,
# a chunk at a time, so memory stays one slot's and the next turn still finds its history.
SLOT_PAGE = 1024
NEXT_QUESTION = 256  # tokens a next question may take, besides its reply (`reserve`)


def common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Slot:
    """One kept KV state: the runtime's object (`state`), the request kind it was made for (`key`: adapter,
    sampling, speculative), the tokens whose K/V it holds exactly, and the reply tokens still to settle."""

    def __init__(self) -> None:
        self.state: Any = None
        self.key: Any = None
        self.exact: List[int] = []
        self.pending: List[int] = []
        self.used = 0
        self.size = 0  # tokens the state was allocated for
        self.grow = False  # move to a larger allocation when idle


class PromptCache:
    """`slots` kept states of `length` tokens each (0 slots: off). The runtime makes and drives the states; this
    picks the slot and the prefix to reuse, and counts reused and prefilled prompt tokens for /metrics."""

    def __init__(self, slots: int, length: int, reserve: int = 0, align: int = 1, page: int = SLOT_PAGE) -> None:
        self.slots = [Slot() for _ in range(max(slots, 0))]
        self.length = length
        self.page = page  # a new state's first allocation (LiteRT's is always the whole context)
        self.reserve = reserve  # free tokens a kept conversation needs for its next turn
        # Positions a runtime prefills in fixed chunks (LiteRT's prefill signature): the exact K/V ends at a multiple
        # of `align`, a reused prefix too, so the rest is chunked exactly as a full prefill chunks it.
        self.align = max(align, 1)
        self.clock = 0
        self.reused = 0
        self.prefilled = 0

    def take(self, key: Any, ids: List[int], total: int, reusable: bool = True) -> Tuple[Optional[Slot], int]:
        """The slot for a request of `ids` needing `total` tokens in all, and how many of `ids` it can keep
        (never all: the last prompt token is appended to get the next logits). (None, 0): no slot fits; the
        least recently used one was freed, so a fresh state stays within the memory the slots were planned for."""
        self.clock += 1
        if not self.slots:
            return None, 0
        if total > self.length:
            lru = min(self.slots, key=lambda s: s.used)
            self.drop(lru)
            return None, 0
        best, n = None, 0
        if reusable:
            for s in self.slots:
                if s.state is not None and s.key == key and s.size >= total:
                    k = min(common_prefix(s.exact, ids), len(ids) - 1) // self.align * self.align
                    if best is None or k > n:
                        best, n = s, k
        if best is None or n == 0:
            best, n = min(self.slots, key=lambda s: (s.state is not None, s.used)), 0
        best.used = self.clock
        return best, n

    def like(self, slots: int) -> "PromptCache":
        """An empty cache of `slots` slots shaped as this one (the bench scenarios' arms)."""
        return PromptCache(slots, self.length, self.reserve, self.align, self.page)

    def claim(self, key: Any, ids: List[int], total: int, seeded: bool) -> Tuple[Optional[Slot], int, bool]:
        """`take`, then whether the slot's state goes on: (slot, n, True) rewinds it to n; (slot, 0, False) means it
        was emptied for a new state of `slot.size` tokens; (None, 0, False) runs on a state of its own. A seeded
        sample never goes on from a kept state (its random state starts with the request: same seed, same text)."""
        slot, n = self.take(key, ids, total, not seeded)
        if slot is None:
            return None, 0, False
        if slot.state is not None and slot.key == key and slot.size >= total and not seeded:
            return slot, n, True
        self.drop(slot)  # its K/V is freed before a new one is allocated
        slot.size = self.size_for(total)
        return slot, 0, False

    def done(self, slot: Slot, key: Any, ids: List[int], new: List[int]) -> None:
        """After a request: `slot` holds `ids` exactly (up to the alignment) and the rest and `new` to settle."""
        exact = len(ids) // self.align * self.align
        slot.key = key
        slot.exact = list(ids[:exact])
        slot.pending = (list(ids[exact:]) + list(new))[: max(slot.size - exact, 0)]
        slot.grow = slot.size < self.length and len(ids) + len(new) + self.reserve > slot.size

    def size_for(self, total: int) -> int:
        """The allocation of a new slot state for a request of `total` tokens."""
        size = self.page
        while size < total:
            size *= 2
        return min(size, self.length)

    def count(self, reused: int, prefilled: int) -> None:
        self.reused += reused
        self.prefilled += prefilled

    def unsettled(self) -> Optional[Slot]:
        """The most recently used slot with idle work: a reply to prefill, or a move to a larger allocation."""
        for s in sorted(self.slots, key=lambda s: -s.used):
            if s.state is not None and (len(s.pending) >= self.align or s.grow):
                return s
        return None

    def regrow(self, slot: Slot) -> List[int]:
        """Free `slot`'s state for a larger one: its tokens become pending; the runtime allocates the new state
        at `slot.size` and prefills them as it settles. Returns the tokens."""
        tokens = slot.exact + slot.pending
        slot.state, slot.exact, slot.pending, slot.grow = None, [], tokens, False
        slot.size = self.size_for(len(tokens) + self.reserve)
        return tokens

    @staticmethod
    def drop(slot: Slot) -> None:
        slot.state, slot.key, slot.exact, slot.pending, slot.size, slot.grow = None, None, [], [], 0, False

    def stats(self) -> Dict[str, int]:
        return {"slots": len(self.slots), "slot_tokens": self.length, "kept": sum(s.state is not None
                                                                                 for s in self.slots),
                "reused_tokens": self.reused, "prefilled_tokens": self.prefilled}
