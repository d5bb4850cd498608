"""The family table (edgepack/data/families.toml): classification of real config shapes, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgepack.errors import ModelError
from edgepack.families import ConfigShape, check, families, match, rope_type, shape_of, sliding_window
from edgepack.testing import TINY_CONFIGS

ROOT = Path(__file__).resolve().parents[2]


def test_every_row_names_a_tiny_checkpoint_and_is_documented() -> None:
    doc = (ROOT / "docs" / "models.md").read_text()
    for f in families():
        assert not f.proof or f.proof in TINY_CONFIGS, f.id
        assert f.id in doc, f"docs/models.md does not mention family {f.id}"
    assert len({f.id for f in families()}) == len(families())


# Shapes as the hub serves them (older transformers wrote rope_scaling / rope_theta; 5.x writes rope_parameters).
PHI35_HUB = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "max_position_embeddings": 131072,
             "original_max_position_embeddings": 4096, "sliding_window": 262144,
             "rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}}
GEMMA3_HUB = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "sliding_window": 512,
              "rope_scaling": None, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0}
QWEN25_HUB = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 32768,
              "use_sliding_window": False, "rope_theta": 1000000.0}
LLAMA32_HUB = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0}}
GEMMA3_TF5 = {"rope_parameters": {"full_attention": {"rope_type": "default"},
                                  "sliding_attention": {"rope_type": "default"}}}


@pytest.mark.parametrize(("config", "rope"), [(PHI35_HUB, "longrope"), (GEMMA3_HUB, "default"),
                                              (LLAMA32_HUB, "llama3"), (GEMMA3_TF5, "default"), ({}, "default")])
def test_rope_type_reads_both_config_layouts(config: dict, rope: str) -> None:  # type: ignore[type-arg]
    assert rope_type(config) == rope


def test_sliding_window_is_only_an_active_one() -> None:
    assert sliding_window(GEMMA3_HUB) == 512
    assert sliding_window(QWEN25_HUB) == 0  # use_sliding_window = false
    assert sliding_window({"sliding_window": 16, "layer_types": ["full_attention"] * 2}) == 0
    assert sliding_window({"sliding_window": None}) == 0


def _shape(config: dict, tmp_path: Path) -> ConfigShape:  # type: ignore[type-arg]
    (tmp_path / "config.json").write_text(json.dumps(config))
    return shape_of(tmp_path / "config.json")


def test_released_shapes_find_their_rows(tmp_path: Path) -> None:
    found = {}
    for name, cfg in (("phi35", PHI35_HUB), ("gemma3", GEMMA3_HUB), ("qwen25", QWEN25_HUB), ("llama32", LLAMA32_HUB)):
        row = match(_shape(cfg, tmp_path), "onnx")
        found[name] = row.id if row else None
    assert found == {"phi35": "phi3-longrope", "gemma3": "gemma3", "qwen25": "qwen2", "llama32": "llama3"}


def test_refusal_lists_what_the_format_takes(tmp_path: Path) -> None:
    shape = _shape({"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2"}, tmp_path)
    with pytest.raises(ModelError) as e:
        check(shape, "onnx", "ONNX")
    assert "does not support architecture 'Olmo2ForCausalLM'" in e.value.message
    assert "Gemma3ForCausalLM" in e.value.fields["supported"] and e.value.fields["other_formats"] == []


def test_a_shape_the_format_refuses_says_what_it_takes(tmp_path: Path) -> None:
    qwen_window = _shape({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 4096,
                          "use_sliding_window": True, "max_position_embeddings": 32768}, tmp_path)
    with pytest.raises(ModelError) as e:
        check(qwen_window, "onnx", "ONNX")
    assert "takes Qwen2ForCausalLM only with rope default and no sliding window" in e.value.message
    assert "sliding window 4096" in e.value.message


def test_a_family_only_the_other_format_takes_names_it(tmp_path: Path) -> None:
    onnx_only = next(f for f in families() if f.formats == ("onnx",) and f.proof)
    shape = ConfigShape(onnx_only.architecture, onnx_only.model_type, onnx_only.rope[0],
                        16 if onnx_only.sliding_window else 0)
    with pytest.raises(ModelError) as e:
        check(shape, "tflite", "TFLite")
    assert "pass --format onnx" in e.value.message and e.value.fields["other_formats"] == ["onnx"]


def test_builder_config_adapter_reshapes_what_the_builder_reads() -> None:
    from edgepack.backends.genai_builder import adapt_config

    gemma3 = adapt_config(SimpleNamespace(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    assert gemma3.rope_parameters["rope_type"] == "default" and gemma3.rope_theta == 1e6
    assert gemma3.rope_local_base_freq == 1e4 and gemma3.rope_parameters["type"] == "default"
    phi = adapt_config(SimpleNamespace(rope_parameters={"rope_type": "longrope", "long_factor": [1.0]}))
    assert phi.rope_parameters["type"] == "longrope"
