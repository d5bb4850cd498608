"""The onnxruntime-genai model builder, run with the few fixes its 0.18 release needs for current checkpoints.

Run as `python -m edgepack.backends.genai_builder <builder arguments>` by the ONNX exporter (in its own process:
the builder imports torch and transformers). Each fix below names the builder bug it works around; every one is
proven by the family tests (tests/integration/test_families.py), which build that family's real config shape
and compare the exported graph's logits with torch's.

- transformers 5 saves rope settings as `rope_parameters` with `rope_type`; the builder's LongRoPE path reads
  the legacy key `type` (KeyError: 'type' on every Phi-3.5/Phi-4-mini saved by transformers 5).
- Gemma 3 text models keep one rope setting per layer type (`full_attention`, `sliding_attention`); the builder
  expects one flat setting plus `rope_local_base_freq` (KeyError: 'rope_type').
- SmolLM3's NoPE layers (every fourth) turn rotary embedding off inside attention but not outside it, so the
  builder asks for a `position_ids` input it never made (KeyError: 'position_ids').

With `--edgepack-streaming` (first argument) the builder reads and quantizes one decoder layer at a time
(streaming.py): the exporter asks for it for the int4/int8 `default` algorithm, whose output it leaves unchanged.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any


def adapt_config(config: Any) -> Any:
    """A transformers config, reshaped where the builder reads an older layout (see the module docstring)."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "rope_type" not in rope:
        full, local = dict(rope["full_attention"]), dict(rope.get("sliding_attention") or rope["full_attention"])
        config.rope_parameters = full
        config.rope_theta = full.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        config.rope_local_base_freq = local.get("rope_theta", config.rope_theta)
        rope = full
    if isinstance(rope, dict) and "rope_type" in rope and "type" not in rope:
        rope["type"] = rope["rope_type"]
    return config


def _patch_smollm3() -> None:
    import importlib

    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as it expects)

    smollm = importlib.import_module("builders.smollm")  # builder.py imports `builders` top-level
    original = smollm.SmolLM3Model.make_attention

    def make_attention(self: Any, layer_id: int, attention: Any, root_input: Any, **kwargs: Any) -> Any:
        use_rope = self.attention_attrs["rope"]
        self.attention_attrs["rope"] = use_rope and bool(self.no_rope_layers[layer_id])
        try:
            return original(self, layer_id, attention, root_input, **kwargs)
        finally:
            self.attention_attrs["rope"] = use_rope

    smollm.SmolLM3Model.make_attention = make_attention


def main() -> None:
    import transformers

    load = transformers.AutoConfig.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        return adapt_config(load(*args, **kwargs))

    transformers.AutoConfig.from_pretrained = from_pretrained  # type: ignore[method-assign]
    _patch_smollm3()
    from edgepack.backends import streaming

    if sys.argv[1:2] == [streaming.STREAMING_FLAG]:
        del sys.argv[1]
        streaming.install(load_config=load)
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
