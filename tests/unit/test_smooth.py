"""SmoothQuant's folds keep every supported family's float model: the same logits, other weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import has

pytestmark = pytest.mark.skipif(not (has("torch") and has("transformers")), reason="needs torch and transformers")

# Each family's own norm names and (1 + w) norms, fused q/k/v (Phi-3), grouped kv heads, q/k norms (Qwen3,
# Gemma 3), norms around the MLP (Gemma 2/3).
FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "mistral"]


CASES = [(f, "smoothquant") for f in FAMILIES] + [(f, "awq") for f in ("llama", "phi3", "gemma2", "qwen3")]


@pytest.mark.parametrize(("family", "method"), CASES)
def test_smoothing_changes_weights_not_the_function(family: str, method: str, tmp_path: Path) -> None:
    import torch
    import transformers

    from edgepack.backends import calibration, smooth
    from edgepack.models import resolve_model
    from edgepack.progress import silent
    from edgepack.quality.texts import heldout
    from edgepack.testing import make_tiny

    folder = make_tiny(family, tmp_path / family, initializer_range=0.1)
    text = tmp_path / "cal.txt"
    text.write_text(heldout().text)
    info = smooth.smooth(resolve_model(str(folder)), tmp_path / "out", calibration.Calibration(text=text, samples=2,
                                                                                         tokens=64), silent,
                         method=method)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert info["layers"] == layers and info["max_scale"] > 1.0
    a = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert float((la - lb).abs().max() / la.abs().max()) < 1e-4
    changed = [n for n, p in a.state_dict().items() if not torch.equal(p, b.state_dict()[n])]
    assert any("down_proj" in n for n in changed) and any("norm" in n for n in changed)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_a_family_without_known_norms_is_refused(tmp_path: Path) -> None:
    from edgepack.backends import calibration, smooth
    from edgepack.errors import ModelError
    from edgepack.models import resolve_model
    from edgepack.progress import silent
    from edgepack.testing import make_tiny

    folder = make_tiny("granite", tmp_path / "granite")
    with pytest.raises(ModelError, match="granite"):
        smooth.smooth(resolve_model(str(folder)), tmp_path / "out", calibration.Calibration(), silent)
    assert not (tmp_path / "out").exists()
