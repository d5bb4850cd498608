"""The gate's float reference holds one decoder layer at a time (checkpoint.layered_model) and scores exactly as the
whole fp32 model does: the same logits bit for bit and the same greedy tokens, across the families' layouts
(tied and untied heads, fused qkv/gate_up, LongRoPE, Gemma's scaled embeddings and sliding layers).
Its memory at 1.1B and 3.8B is measured in docs/performance.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..conftest import needs_onnx

pytestmark = [pytest.mark.integration, needs_onnx]


@pytest.mark.parametrize("family", ["llama", "phi3-longrope", "gemma3", "qwen3", "granite"])
def test_layered_reference_is_the_whole_model(family: str, tmp_path: Path) -> None:
    import torch
    import transformers

    from edgepack.checkpoint import layered_model
    from edgepack.testing import make_tiny

    folder = make_tiny(family, tmp_path / family, layers=3)
    whole = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layered = layered_model(folder)
    assert layered is not None, "the layered loader refused a plain safetensors checkpoint"

    total = sum(p.numel() for p in whole.parameters())
    resident: list[int] = []
    for layer in [m for m in layered.modules() if isinstance(m, torch.nn.ModuleList)][0]:
        layer.register_forward_pre_hook(  # runs after the loader's own pre-hook: the layer is in memory
            lambda *_: resident.append(sum(p.numel() for p in layered.parameters() if not p.is_meta)))
    ids = torch.tensor([[1, 5, 9, 200, 3, 77, 12, 400, 8, 8, 31]])
    with torch.inference_mode():
        assert torch.equal(whole(ids).logits, layered(ids).logits)
        kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(whole.generate(ids, **kwargs), layered.generate(ids, **kwargs))
    # Never more than what sits outside the layers plus one layer: the model is never whole in memory.
    per_layer = sum(p.numel() for p in whole.model.layers[0].parameters())
    outside = total - per_layer * whole.config.num_hidden_layers
    assert resident and max(resident) == outside + per_layer
    assert max(resident) < total


def test_unusable_checkpoint_falls_back_to_whole_model(tmp_path: Path) -> None:
    from edgepack.checkpoint import float_model, layered_model
    from edgepack.testing import make_tiny

    folder = make_tiny("llama", tmp_path / "m")
    for f in folder.glob("*.safetensors"):  # a checkpoint saved as a pickle: nothing to read lazily
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(f), folder / "pytorch_model.bin")
        f.unlink()
    assert layered_model(folder) is None
    model = float_model(folder)
    assert all(not p.is_meta for p in model.parameters())


@pytest.mark.parametrize(("method", "symmetric"), [("gptq", True), ("imatrix", False)])
def test_gptq_and_imatrix_on_the_layered_model_give_the_same_codes(method: str, symmetric: bool, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQ holds each layer while it writes the dequantized weights back and runs the layer again for the next
    one's inputs: the codes and scales are those of the whole fp32 model."""
    import torch

    from edgepack import checkpoint
    from edgepack.backends import calibration, gptq
    from edgepack.models import resolve_model
    from edgepack.testing import make_tiny

    folder = make_tiny("llama", tmp_path / "m", layers=3)
    text = tmp_path / "cal.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    source = resolve_model(str(folder))
    cal = calibration.Calibration(text=text, samples=4, tokens=64)

    def run() -> list[tuple[str, gptq.Quantized]]:
        return list(gptq.quantize_model(source, 32, cal, head=True, progress=lambda _e: None, method=method,
                                        symmetric=symmetric))

    layered = run()
    monkeypatch.setattr(checkpoint, "layered_model", lambda *_a, **_k: None)  # the whole model, as before
    whole = run()
    assert [n for n, _ in layered] == [n for n, _ in whole] and len(whole) == 3 * 5 + 1
    for (_, a), (_, b) in zip(layered, whole, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
