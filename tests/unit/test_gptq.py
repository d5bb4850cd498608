"""GPTQ's arithmetic against round-to-nearest, on random matrices (fast, no model)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from edgepack.backends import gptq  # noqa: E402


def _case(n: int = 48, k: int = 128, seed: int = 0) -> tuple[object, object]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)  # correlated inputs, like real activations
    x = torch.randn(512, k, generator=g) @ mix
    x[:, 3] *= 20  # an outlier channel
    return w, (x.T @ x).double()


def test_identity_hessian_is_round_to_nearest() -> None:
    w, _ = _case()
    assert torch.equal(gptq.gptq(w, torch.eye(128), 32, damp=0.0).codes, gptq.rtn(w, 32).codes)


def test_gptq_lowers_the_output_error_that_rtn_leaves() -> None:
    w, h = _case()

    def loss(q: gptq.Quantized) -> float:
        d = (gptq.dequantize(q, 32) - w).double()
        return float(torch.einsum("nk,kl,nl->", d, h, d))

    assert loss(gptq.gptq(w, h, 32)) < 0.7 * loss(gptq.rtn(w, 32))


def test_codes_scales_and_packing_follow_matmulnbits() -> None:
    w, h = _case()
    q = gptq.gptq(w, h, 32)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 15 and q.scales.shape == (48, 4)
    packed, scales = gptq.pack(q, 32)
    assert packed.shape == (48, 4, 16) and packed.dtype.name == "uint8" and scales.dtype.name == "float32"
    lo, hi = packed & 0xF, packed >> 4
    assert (lo[:, 0, 0] == q.codes[:, 0].numpy()).all() and (hi[:, 0, 0] == q.codes[:, 1].numpy()).all()


def test_block_must_divide_the_input_size() -> None:
    from edgepack.errors import UserError

    w, h = _case(k=96)
    with pytest.raises(UserError, match="does not divide"):
        gptq.gptq(w, h[:96, :96], 64)


def test_imatrix_scale_search_lowers_the_activation_weighted_error_in_rtns_layout() -> None:
    w, h = _case()
    importance = torch.diagonal(h)
    q_rtn, q_im = gptq.rtn(w, 32), gptq.search_scales(w, importance, 32)

    def weighted(q: gptq.Quantized) -> float:
        return float((((gptq.dequantize(q, 32) - w).double() ** 2) * importance).sum())

    assert weighted(q_im) < 0.9 * weighted(q_rtn)
    assert q_im.codes.dtype == torch.uint8 and int(q_im.codes.max()) <= 15
    assert q_im.scales.shape == q_rtn.scales.shape  # the same MatMulNBits initializers: RTN's graph and speed
    # with no activation information (flat importance) it is a plain scale search: never worse than RTN
    flat = gptq.search_scales(w, torch.ones(128), 32)
    assert float(((gptq.dequantize(flat, 32) - w) ** 2).sum()) <= float(((gptq.dequantize(q_rtn, 32) - w) ** 2).sum())


def test_asymmetric_search_writes_matmulnbits_zero_points_and_beats_min_max_rtn() -> None:
    w, h = _case()
    w = w + 0.05  # off-centre groups: where a zero point pays
    importance = torch.diagonal(h)
    q = gptq.search_scales_asymmetric(w, importance, 32)
    assert q.zero_points.shape == (48, 4) and int(q.zero_points.max()) <= 15 and int(q.codes.max()) <= 15
    # min-max asymmetric RTN, as the builder writes it
    g = w.double().reshape(48, 4, 32)
    lo, hi = g.amin(2, keepdim=True).clamp(max=0), g.amax(2, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.clamp(torch.round(-lo / s), 0, 15)
    codes = torch.clamp(torch.round(g / s) + z, 0, 15)
    minmax = gptq.Quantized(codes=codes.reshape(48, 128).to(torch.uint8), scales=s.squeeze(2).float(),
                            zero_points=z.squeeze(2).to(torch.uint8))

    def weighted(x: gptq.Quantized) -> float:
        return float((((gptq.dequantize(x, 32) - w).double() ** 2) * importance).sum())

    assert weighted(q) < 0.9 * weighted(minmax)
    packed = gptq.pack_zero_points(q)  # two blocks of a row per byte, low nibble first
    assert packed.shape == (48, 2)
    zp = q.zero_points.numpy()
    assert ((packed & 0xF) == zp[:, 0::2]).all() and ((packed >> 4) == zp[:, 1::2]).all()
