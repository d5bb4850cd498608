"""imatrix's scale search: per group of `block` weights, the int4 scale (and zero point) that minimises the
importance-weighted error sum_j a_j (w_j - s (q_j - z))^2, where a_j is input channel j's mean squared activation
over the calibration tokens (llama.cpp's importance matrix, the diagonal of GPTQ's Hessian).

Candidates are the min-max (asymmetric) or signed-extreme (symmetric) scale times a grid of factors, and for
asymmetric each factor's zero point round(-min / s) with its two neighbours. Each candidate is screened by the
error of its codes at their weighted least-squares scale (closed form, no second rounding); the best one per group
is then refined by a few rounds of codes for the scale and the scale for the codes, kept where they lower the
error. Rows are searched in cache-sized chunks of float32 on every core (torch lets go of the GIL).

The first version (float64, every candidate re-rounded, 41 and 93 candidates) took ~80 and ~110 min per billion
weights on 2 cores. This one leaves 0.995× (symmetric) and 0.999× (asymmetric) of its weighted error on random
1536×576 and 576×1536 weights with peaked importances, in 1/43 to 1/60 of the time; ~90 s per billion weights
on 2 cores (docs/targets.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from edgepack.errors import UserError

_CHUNK_ELEMENTS = 1 << 17  # weights per chunk (512 KB of float32): the candidates' passes stay in cache
_THREADS = 4
_REFINE = 2  # rounds of codes-for-scale, scale-for-codes after the grid


@dataclass
class Quantized:
    codes: Any  # uint8 [N, K] in 0..15
    scales: Any  # float32 [N, K // block]
    zero_points: Any = None  # uint8 [N, K // block] in 0..15 (asymmetric); None: symmetric, every zero point 8


def _least_squares(g: Any, a: Any, c: Any, fallback: Any, positive: bool) -> tuple[Any, Any]:
    """The weighted least-squares scale of codes c (centred) per group, and the error it leaves."""
    import torch

    ac = a * c
    den = (ac * c).sum(2, keepdim=True)
    num = (ac * g).sum(2, keepdim=True)
    ok = (den > 0) & (num > 0) if positive else den > 0
    s = torch.where(ok, num / den.clamp(min=1e-30), fallback)
    return s, (a * (g - c * s) ** 2).sum(2, keepdim=True)


def _search(weight: Any, importance: Any, block: int, chunk: Callable[[Any, Any], tuple[Any, Any, Any]]
            ) -> tuple[Any, Any, Any]:
    """Run `chunk(groups, importance)` → (codes, scales, zero points) over row chunks on every core."""
    import torch

    n, k = weight.shape
    if k % block:
        raise UserError(f"block size {block} does not divide the input size {k} of a weight.",
                        hint="Use a quantize.block_size that divides every matmul's input size.")
    W = weight.detach().float()
    a = importance.detach().float().reshape(1, k // block, block)
    a = a + 1e-6 * a.mean().clamp(min=1e-30)  # channels never active still count a little
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // block, dtype=torch.float32)
    zeros = torch.empty(n, k // block, dtype=torch.uint8)
    rows = max(1, _CHUNK_ELEMENTS // k)

    def run(r0: int) -> None:
        g = W[r0:r0 + rows].reshape(-1, k // block, block)
        q, s, z = chunk(g, a)
        m = g.shape[0]
        codes[r0:r0 + m] = q.reshape(m, k).to(torch.uint8)
        scales[r0:r0 + m] = s.squeeze(2)
        zeros[r0:r0 + m] = z.squeeze(2).to(torch.uint8)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool is the parallelism: torch's own threads inside it cost 30 % (measured)
    try:
        with ThreadPoolExecutor(max_workers=min(_THREADS, len(os.sched_getaffinity(0)))) as pool:
            list(pool.map(run, range(0, n, rows)))
    finally:
        torch.set_num_threads(threads)
    return codes, scales, zeros


def _grid(g: Any, a: Any, candidates: list[tuple[Any, Any]], positive: bool) -> tuple[Any, Any, Any]:
    """Screen (scale, zero point) candidates, then refine the best per group: (codes, scale, zero point).
    `positive`: the scale must stay positive (asymmetric); the builder's symmetric scales carry the extreme's sign."""
    import torch

    gg = (a * g * g).sum(2, keepdim=True)
    best = torch.full_like(gg, float("inf"))
    best_s, best_z = candidates[0]
    best_s, best_z = best_s.clone(), best_z.clone()
    c = torch.empty_like(g)
    ac = torch.empty_like(g)
    for sf, z in candidates:
        torch.div(g, sf, out=c)
        c.round_().add_(z).clamp_(0, 15).sub_(z)  # centred codes
        torch.mul(a, c, out=ac)
        den = (ac * c).sum(2, keepdim=True)
        num = (ac * g).sum(2, keepdim=True)
        ok = (den > 0) & (num > 0) if positive else den > 0
        err = torch.where(ok, gg - num * num / den.clamp(min=1e-30), torch.full_like(gg, 1e38))
        better = err < best
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, sf, best_s), torch.where(better, z, best_z)

    def fit(scale: Any) -> tuple[Any, Any, Any]:
        q = torch.clamp(torch.round(g / scale) + best_z, 0, 15)
        s, err = _least_squares(g, a, q - best_z, scale, positive)
        return q, s, err

    q, s, err = fit(best_s)
    for _ in range(_REFINE):
        q2, s2, err2 = fit(s)
        keep = err2 < err
        q, s, err = torch.where(keep, q2, q), torch.where(keep, s2, s), torch.where(keep, err2, err)
    return q, s, best_z


def search_scales(weight: Any, importance: Any, block: int, *, lo: float = 0.7, hi: float = 1.1,
                  steps: int = 21) -> Quantized:
    """Activation-aware RTN, symmetric: the builder's grid (codes 0..15 around 8, the group's signed extreme on
    code 0) with the scale searched. Only codes and scales change: the graph, kernels and speed are RTN's."""
    import torch

    def chunk(g: Any, a: Any) -> tuple[Any, Any, Any]:
        idx = torch.argmax(g.abs(), dim=2, keepdim=True)
        m = torch.gather(g, 2, idx)
        s0 = torch.where(m == 0, torch.ones_like(m), m / -8.0)
        eight = torch.full_like(s0, 8.0)
        return _grid(g, a, [(s0 * f, eight) for f in torch.linspace(lo, hi, steps).tolist()], positive=False)

    codes, scales, _ = _search(weight, importance, block, chunk)
    return Quantized(codes=codes, scales=scales)


def search_scales_asymmetric(weight: Any, importance: Any, block: int, *, lo: float = 0.8, hi: float = 1.1,
                             steps: int = 13) -> Quantized:
    """Asymmetric int4 (MatMulNBits' integer zero points): w ≈ s (q - z), q and z in 0..15, the k-quant-style
    pair search of llama.cpp's make_qkx weighted by the importance matrix."""
    import torch

    def chunk(g: Any, a: Any) -> tuple[Any, Any, Any]:
        lo_v = g.amin(2, keepdim=True).clamp(max=0)  # the builder's grid always holds 0 exactly
        span = g.amax(2, keepdim=True).clamp(min=0) - lo_v
        s0 = torch.where(span == 0, torch.ones_like(span), span / 15.0)
        candidates = []
        for f in torch.linspace(lo, hi, steps).tolist():
            sf = s0 * f
            mid = torch.round(-lo_v / sf)
            candidates += [(sf, torch.clamp(mid + dz, 0, 15)) for dz in (-1.0, 0.0, 1.0)]
        return _grid(g, a, candidates, positive=True)

    codes, scales, zeros = _search(weight, importance, block, chunk)
    return Quantized(codes=codes, scales=scales, zero_points=zeros)
