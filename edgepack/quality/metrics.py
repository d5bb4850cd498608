"""Numbers that compare two models' next-token distributions on the same tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def log_softmax(logits: Any) -> Any:
    import numpy as np

    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class WindowTopK:
    """The reference's view of one window: what the quantized run is compared with."""

    target_ids: Any  # [T-1] next tokens
    nll: Any  # [T-1] reference negative log-likelihood of the next token
    topk_ids: Any  # [T-1, K]
    topk_logp: Any  # [T-1, K]


def reference_window(logits: Any, ids: list[int], k: int) -> WindowTopK:
    import numpy as np

    lp = log_softmax(logits[:-1])
    tgt = np.asarray(ids[1:])
    nll = -lp[np.arange(len(tgt)), tgt]
    top = np.argsort(-lp, axis=-1)[:, :k]
    return WindowTopK(tgt, nll, top, np.take_along_axis(lp, top, axis=-1))


@dataclass(frozen=True)
class Comparison:
    nll_sum: float
    kl_sum: float
    top1_agree: int
    count: int


def compare_window(ref: WindowTopK, logits: Any) -> Comparison:
    """KL(ref || quant) over the reference's top-K plus one tail bucket: a lower bound on the full KL."""
    import numpy as np

    lq = log_softmax(logits[:-1])
    n = len(ref.target_ids)
    nll_q = -lq[np.arange(n), ref.target_ids]
    p_top = np.exp(ref.topk_logp)
    q_top_lp = np.take_along_axis(lq, ref.topk_ids, axis=-1)
    kl = (p_top * (ref.topk_logp - q_top_lp)).sum(axis=-1)
    p_tail = np.clip(1.0 - p_top.sum(axis=-1), 1e-12, 1.0)
    q_tail = np.clip(1.0 - np.exp(q_top_lp).sum(axis=-1), 1e-12, 1.0)
    kl += p_tail * (np.log(p_tail) - np.log(q_tail))
    agree = int((lq.argmax(axis=-1) == ref.topk_ids[:, 0]).sum())
    return Comparison(float(nll_q.sum()), float(np.maximum(kl, 0).sum()), agree, n)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / max(count, 1))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
